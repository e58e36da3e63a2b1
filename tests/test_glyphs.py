"""The glyph set: its candidate pool's rules, its classes and its images (what every embedded set
must do is tested in test_embedded_datasets.py)."""

from __future__ import annotations

import pathlib
import time
import unicodedata

import numpy as np
import pytest

from metadiff_jax.data import glyphs


@pytest.fixture(scope="module")
def pool():
  return glyphs.candidate_characters()


@pytest.fixture(scope="module")
def small():
  return glyphs.generate(num_classes=50, images_per_class=4, seed=0)


def test_fonts_are_dejavu_and_stix_general_only():
  paths = glyphs.font_paths()
  names = [pathlib.Path(p).name for p in paths]
  assert names == sorted(names)
  assert "DejaVuSans.ttf" in names and "STIXGeneral.ttf" in names
  for name in names:
    assert name.startswith(("DejaVu", "STIXGeneral")), name
    assert not name.startswith(("cm", "STIXNonUni", "STIXSiz", "LastResort")), name


def test_default_pool_is_large_enough_and_drawn_by_allowed_faces(pool):
  assert len(pool) >= 640  # the default num_classes, with room to choose by block
  allowed = set(glyphs.font_paths())
  chars = [char for char, _ in pool]
  assert chars == sorted(chars) and len(set(chars)) == len(chars)
  for char, faces in pool:
    assert faces and set(faces) <= allowed, char
    assert list(faces) == sorted(faces, key=lambda p: pathlib.Path(p).name)


def test_pool_excludes_marks_controls_and_compatibility_forms(pool):
  from fontTools import unicodedata as ft_unicodedata
  nfkd = set()
  for char, _ in pool:
    assert ft_unicodedata.block(char) not in glyphs._EXCLUDED_BLOCKS, char
    category = unicodedata.category(char)
    assert category[0] in "LNPS" and category not in ("Lm", "Sk"), (char, category)
    assert not 0x1D400 <= ord(char) <= 0x1D7FF, char  # Mathematical Alphanumeric Symbols
    assert not 0xE000 <= ord(char) <= 0xF8FF, char  # private use
    assert unicodedata.normalize("NFKD", char) == unicodedata.normalize("NFD", char), char
    assert unicodedata.normalize("NFC", char) == char, char
    assert unicodedata.normalize("NFKD", char) not in nfkd, char
    nfkd.add(unicodedata.normalize("NFKD", char))
    name = unicodedata.name(char)
    assert not name.startswith(("FULLWIDTH", "SUPERSCRIPT", "SUBSCRIPT", "MODIFIER")), name
    assert not ("CIRCLED" in name and ("DIGIT" in name or "LETTER" in name)), name


def test_pool_has_at_most_two_accented_variants_per_letter(pool):
  bases = [unicodedata.normalize("NFD", c)[0] for c, _ in pool
           if len(unicodedata.normalize("NFD", c)) > 1]
  assert bases and max(bases.count(b) for b in set(bases)) <= 2


def test_pool_drops_homoglyphs_and_case_twins(pool):
  chars = {char for char, _ in pool}
  cyrillic_latin_twins = "АВЕКМНОРСТХаеорсух"
  greek_latin_twins = "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧο"
  assert not chars & set(cyrillic_latin_twins + greek_latin_twins)
  assert len(chars & set("1Il|")) <= 1
  assert len(chars & set("0OОΟ")) <= 1
  for upper in "COSVWXZẞ":
    assert not {upper, upper.lower()} <= chars, upper
  # Same letter name but for script and case: one kept.
  keys = [unicodedata.name(c).split(" LETTER ", 1)[1] for c in chars
          if " LETTER " in unicodedata.name(c)]
  keys = [" ".join(w for w in k.split() if w not in ("CAPITAL", "SMALL")) for k in keys]
  assert len(keys) == len(set(keys))


def test_pool_glyphs_have_ink_in_every_listed_face(pool):
  for char, faces in pool:
    for face in faces:
      assert glyphs._render(face, char, 24) is not None, (char, face)


def test_another_seed_draws_other_characters(small):
  other = glyphs.generate(num_classes=50, images_per_class=4, seed=1)
  assert other.class_names != small.class_names


def test_classes_are_pool_characters_named_by_code_point(small, pool):
  pool_chars = {char for char, _ in pool}
  for label, name in enumerate(small.class_names):
    char = small.class_char(label)
    assert char in pool_chars
    assert name == f"U+{ord(char):04X} {unicodedata.name(char)}"


def test_classes_spread_over_blocks(pool):
  from fontTools import unicodedata as ft_unicodedata
  chosen = glyphs._choose_classes(pool, 200, np.random.default_rng(0))
  blocks = [ft_unicodedata.block(pool[i][0]) for i in chosen]
  assert len(set(blocks)) >= 30
  assert max(blocks.count(b) for b in set(blocks)) <= 10


def test_images_are_visible_and_inside_the_frame(small):
  images = small.images[..., 0]
  assert (images.reshape(len(images), -1).max(1) == 255).all()
  assert ((images > 128).reshape(len(images), -1).sum(1) >= 8).all()
  ring = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
  assert (ring == 0).all()
  # Images of a class differ (random face and transform), but not all classes look alike.
  assert not np.array_equal(images[0], images[1])


def test_other_image_size():
  glyph_set = glyphs.generate(num_classes=5, images_per_class=2, image_size=28, seed=3)
  assert glyph_set.images.shape == (10, 28, 28, 1)
  ring = glyph_set.images[:, [0, -1], :, 0]
  assert (ring == 0).all()


def test_time_a_small_generate(pool):
  start = time.perf_counter()
  glyphs.generate(num_classes=64, images_per_class=20, seed=5)
  elapsed = time.perf_counter() - start
  print(f"generate(64 classes x 20 images): {elapsed:.2f} s "
        f"(x10 for the default 640 classes)")
