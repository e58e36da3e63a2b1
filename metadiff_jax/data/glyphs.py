"""Glyphs: a synthetic few-shot dataset drawn from the fonts that ship inside matplotlib.

In the spirit of Omniglot (many classes, few images each, white strokes on black), but not a
benchmark from the literature: every class is one Unicode character, every image that character
rendered by `matplotlib.ft2font` in one of matplotlib's bundled DejaVu or STIX faces, with a
small random affine transform and stroke-width change. It needs no download, so the whole method
can run anywhere. See docs/GLYPHS.md for the rules and the measured build time.

The set is defined by matplotlib's bundled fonts (and FreeType, Pillow and fontTools' Unicode
block table), so another matplotlib version may give other images; key caches on
`embedded.fingerprint(glyph_set)`, not on the arguments of `generate`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import pathlib
import re
import unicodedata

import matplotlib
import numpy as np
from fontTools import unicodedata as ft_unicodedata
from matplotlib import ft2font
from PIL import Image

from metadiff_jax.data import embedded

DEFAULT_NUM_CLASSES = 640  # splits 410 / 102 / 128

# The regular face of each design, plus the two true italics (whose letters change shape, as the
# single-storey italic "a"): look-alikes are searched for in these renderings.
_REFERENCE_FACES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "STIXGeneral.ttf",
                    "DejaVuSerif-Italic.ttf", "STIXGeneralItalic.ttf")
_EXCLUDED_BLOCKS = frozenset({
    # Styled copies of Latin letters and digits (NFKD also catches them; stated for clarity).
    "Mathematical Alphanumeric Symbols",
    # Line fragments and filled rectangles: dozens of near-identical shapes at 32 px.
    "Box Drawing", "Block Elements",
    # Their content (card indices, pips, "NUL"-style abbreviations, "OBJ") is too small at 32 px.
    "Playing Cards", "Domino Tiles", "Mahjong Tiles", "Control Pictures", "Specials",
    # Pieces of Arabic letters for shaping, not characters (the rest decompose under NFKD).
    "Arabic Presentation Forms-A", "Arabic Presentation Forms-B",
    # The Fraser (Lisu) alphabet is made of turned and plain Latin capitals.
    "Lisu",
})
# Digits and letters in a circle or a box are digits and letters; NFKD misses the dingbat ones.
_ENCLOSED_NAME = re.compile(r"\b(CIRCLED|PARENTHESIZED|SQUARED)\b.*\b(DIGIT|LETTER|NUMBER)\b")
# Zero is an O that is only narrower, or dotted or slashed in some faces (DejaVu Sans Mono): the
# look-alike test below would drop O and then let Cyrillic and Greek O back in beside it.
_EXCLUDED_CHARS = frozenset("0")
_MAX_ACCENTED_PER_BASE = 2
# Fitted into a square, a glyph longer than this (bars, dashes, "l", "!", long arrows) is a thin
# line that no longer tells one character from another.
_MAX_ASPECT = 4.0
_COMPARE_SIZE = 20  # side of the images the look-alike test compares: a cell is ~1.5 px of 32

_MASTER_SIZE = 96  # longest side of the high-resolution glyph each image is transformed from, px
_SUPERSAMPLE = 4  # images are drawn at this multiple of image_size, then box-averaged down
_MAX_MAGNIFY = 2.0  # most a glyph is magnified beyond its size in a font whose em is the frame
_INK = 32  # coverage (of 255) that counts as ink when finding a glyph's extent
_FLAGS = ft2font.LoadFlags.NO_HINTING  # hinting snaps to a pixel grid we resample anyway


class GlyphSet(embedded.EmbeddedSet):
  """A generated glyph set (fields as `embedded.EmbeddedSet`).

  Attributes:
    images: [n, H, W, 1] uint8, white glyph on a black (0) background.
    class_names: [num_classes] "U+0416 CYRILLIC CAPITAL LETTER ZHE" per class.
  """

  def class_char(self, label: int) -> str:
    """The character of global class `label`."""
    return chr(int(self.class_names[label].split()[0][2:], 16))


def font_paths() -> tuple[str, ...]:
  """matplotlib's bundled DejaVu and STIXGeneral faces, sorted by file name.

  Left out: the Computer Modern `cm*` faces and STIX's NonUnicode and size-variant faces, which put
  TeX symbols on ordinary code points (cmr10's "A" slot is not always an "A"), and LastResort,
  which draws a placeholder for every code point.
  """
  font_dir = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"
  names = sorted(p.name for p in font_dir.glob("*.ttf")
                 if p.name.startswith("DejaVu") or p.name.startswith("STIXGeneral"))
  return tuple(str(font_dir / name) for name in names)


@functools.lru_cache(maxsize=None)
def _font(path: str) -> ft2font.FT2Font:
  return ft2font.FT2Font(path)


def _render(path: str, char: str, size: float) -> np.ndarray | None:
  """The glyph's coverage cropped to its ink, [h, w] uint8, or None when nothing is drawn."""
  font = _font(path)
  font.set_size(size, 72)  # at 72 dpi, points are pixels
  font.set_text(char, flags=_FLAGS)
  font.draw_glyphs_to_bitmap()
  image = np.asarray(font.get_image())
  rows = np.flatnonzero((image > _INK).any(1))
  cols = np.flatnonzero((image > _INK).any(0))
  if rows.size == 0:
    return None
  return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _has_outline(path: str, char: str) -> bool:
  """Whether the face's glyph for `char` has an outline of non-zero width and height."""
  glyph = _font(path).load_char(ord(char), flags=_FLAGS)
  return glyph.width > 0 and glyph.height > 0


def _class_name(char: str) -> str:
  return f"U+{ord(char):04X} {unicodedata.name(char)}"


def _allowed_code_point(char: str) -> bool:
  """Whether a character may be a class before looking at its shape."""
  category = unicodedata.category(char)
  if category[0] not in "LNPS":  # no marks, controls, formats, spaces, unassigned
    return False
  # Modifier letters and symbols are raised or shrunken copies of other characters ("ˆ", "˂")
  # or bare accents; fitted to the frame they would meet their full-size twins.
  if category in ("Lm", "Sk"):
    return False
  if unicodedata.normalize("NFC", char) != char:  # singletons such as KELVIN SIGN -> K
    return False
  # A compatibility decomposition marks a styled or positioned copy of another character:
  # fullwidth, superscript, circled, math-styled, presentation forms, ligatures.
  if unicodedata.normalize("NFKD", char) != unicodedata.normalize("NFD", char):
    return False
  if char in _EXCLUDED_CHARS or ft_unicodedata.block(char) in _EXCLUDED_BLOCKS:
    return False
  return not _ENCLOSED_NAME.search(unicodedata.name(char, ""))


def _fit_for_comparison(ink: np.ndarray) -> np.ndarray:
  """A glyph scaled to fill the comparison grid less a 1-cell border, centred, its peak at 255.

  Returns:
    [_COMPARE_SIZE, _COMPARE_SIZE] uint8. The peak is normalised so that a hairline counts as much
    as a bold stroke.
  """
  size = _COMPARE_SIZE
  h, w = ink.shape
  scale = (size - 2) / max(h, w)
  new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
  glyph = Image.fromarray(ink).resize((new_w, new_h), Image.BOX)
  canvas = Image.new("L", (size, size))
  canvas.paste(glyph, ((size - new_w) // 2, (size - new_h) // 2))
  image = np.asarray(canvas, np.float64)
  return np.rint(image * (255.0 / max(image.max(), 1.0))).astype(np.uint8)


def _lookalikes(ids: list[int], images: np.ndarray) -> list[tuple[int, int]]:
  """Pairs of ids whose glyphs cover each other: no stroke of one is away from all of the other's.

  Glyph a is covered by b when every cell where a is solid (>= 128) lies next to (within one cell
  of) a cell where b has any ink (>= 32). So a stroke, dot, bar or gap of a that b lacks, more
  than about 1.5 px of a 32 px image away from b's strokes, makes them different; bold and light
  versions of one shape cover each other, and so do small shifts and changes of proportion.

  Args:
    ids: [n] increasing candidate indices.
    images: [n, _COMPARE_SIZE, _COMPARE_SIZE] uint8 from `_fit_for_comparison`.

  Returns:
    (ids[a], ids[b]) with a < b for every pair that covers each other.
  """
  n, size, _ = images.shape
  solid = (images >= 128).reshape(n, -1).astype(np.float32)
  inked = np.pad(images >= 32, ((0, 0), (1, 1), (1, 1)))
  near = np.zeros((n, size, size), bool)
  for dy in range(3):
    for dx in range(3):
      near |= inked[:, dy:dy + size, dx:dx + size]
  # Counts of 0/1 products stay integers below 2 ** 24: exact in float32 whatever the BLAS.
  covered = (solid @ near.reshape(n, -1).astype(np.float32).T) == solid.sum(1)[:, None]
  a, b = np.nonzero(np.triu(covered & covered.T, 1))
  ids = np.asarray(ids)
  return list(zip(ids[a].tolist(), ids[b].tolist()))


@functools.lru_cache(maxsize=None)
def candidate_characters() -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Every character a class may be, in code-point order, with the faces that draw it.

  A face draws a character when its cmap maps it and its glyph has ink. Rules (docs/GLYPHS.md):
  letters, numbers, punctuation and symbols only, not modifier letters or symbols; no
  compatibility variants (NFKD) or canonical singletons (NFC); no excluded block, no enclosed
  digit or letter, no "0"; at most two precomposed accented variants per base letter; no glyph
  more than 4x longer than wide; then no character that is a look-alike (see `_lookalikes`) of an
  earlier one in some reference face, or a namesake letter of an earlier one (same Unicode name
  but for script and case). Code-point order puts Latin before Greek and Cyrillic, and capitals
  before small letters, so those are what stay.

  Returns:
    ((char, font paths sorted by file name), ...). Cached; takes a few seconds the first time.
  """
  paths = font_paths()
  faces_of = collections.defaultdict(list)
  for path in paths:
    for code in _font(path).get_charmap():
      faces_of[code].append(path)

  accented = collections.Counter()
  chars = []
  for code in sorted(faces_of):
    char = chr(code)
    if not _allowed_code_point(char):
      continue
    decomposed = unicodedata.normalize("NFD", char)
    if len(decomposed) > 1:
      # Beyond two, accent variants of one letter differ only by a few pixels at 32 px.
      if accented[decomposed[0]] >= _MAX_ACCENTED_PER_BASE:
        continue
      accented[decomposed[0]] += 1
    chars.append(char)

  reference = {str(pathlib.Path(p).name): p for p in paths}
  reference = [reference[name] for name in _REFERENCE_FACES]
  drawn = []  # (char, faces with ink)
  fitted = collections.defaultdict(dict)  # rendering -> candidate index -> fitted glyph
  for char in chars:
    faces, inks = [], {}
    for path in faces_of[ord(char)]:
      if path in reference:  # rendered large enough to compare shapes
        ink = _render(path, char, 48)
        if ink is not None:
          faces.append(path)
          inks[path] = ink
      elif _has_outline(path, char):  # the rest only need an ink check; rendering is 3x slower
        faces.append(path)
    if not inks:
      continue
    h, w = next(iter(inks.values())).shape
    if max(h, w) > _MAX_ASPECT * min(h, w):
      continue
    for path, ink in inks.items():
      fitted[path][len(drawn)] = _fit_for_comparison(ink)
    # Each candidate's first reference rendering also meets every other's, across faces.
    fitted["first"][len(drawn)] = fitted[next(iter(inks))][len(drawn)]
    drawn.append((char, tuple(faces)))

  # Letters that Unicode names alike but for script and case ("GREEK CAPITAL LETTER PSI",
  # "CYRILLIC SMALL LETTER PSI", "LATIN LETTER SMALL CAPITAL A", "LATIN CAPITAL LETTER A") are one
  # letter in different dress; often one is the other's shape at another size (ẞ and ß), which
  # fitting to the frame undoes.
  pairs = set()
  namesakes = collections.defaultdict(list)
  for i, (char, _) in enumerate(drawn):
    name = unicodedata.name(char)
    if " LETTER " in name:
      words = name.split(" LETTER ", 1)[1].split()
      namesakes[" ".join(w for w in words if w not in ("CAPITAL", "SMALL"))].append(i)
  for group in namesakes.values():
    pairs.update(itertools.combinations(group, 2))
  for rendering in fitted.values():
    ids = sorted(rendering)
    pairs.update(_lookalikes(ids, np.stack([rendering[i] for i in ids])))
  # The later character of every pair goes, even where the earlier one went too: otherwise a chain
  # (O, then Cyrillic O) would keep a look-alike of a character that some third one replaced.
  dropped = {j for _, j in pairs}
  return tuple(c for i, c in enumerate(drawn) if i not in dropped)


def _choose_classes(pool: tuple[tuple[str, tuple[str, ...]], ...], num_classes: int,
                    rng: np.random.Generator) -> list[int]:
  """Indices into pool: one character per Unicode block in turn, so no script or block dominates.

  Blocks and the characters within each are visited in a seeded random order; a block with few
  candidates runs out and the rest share what is left.
  """
  by_block = collections.defaultdict(list)
  for i, (char, _) in enumerate(pool):
    by_block[ft_unicodedata.block(char)].append(i)
  queues = [list(rng.permutation(by_block[name])) for name in sorted(by_block)]
  order = rng.permutation(len(queues))
  chosen = []
  while len(chosen) < num_classes:
    for q in order:
      if queues[q] and len(chosen) < num_classes:
        chosen.append(int(queues[q].pop()))
  return sorted(chosen)


def _rank3(image: np.ndarray, reduce: np.ufunc) -> np.ndarray:
  """3x3 max (dilation) or min (erosion) filter of [h, w] uint8, edges padded with 0.

  Separable, so 4 passes instead of PIL's per-pixel sort: about 5x faster.
  """
  padded = np.pad(image, 1)
  rows = reduce(reduce(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
  return reduce(reduce(rows[:-2], rows[1:-1]), rows[2:])


@dataclasses.dataclass(frozen=True)
class _Master:
  """A glyph at high resolution, ready to be drawn many times.

  Attributes:
    image: the glyph's coverage cropped to its ink plus a 2 px black border, longest side at least
      0.75 * _MASTER_SIZE.
    em: the em size it was rendered at, px.
    ink: the sum of `image`.
    hull: [2, k] (x, y) pixel centres that include every corner of the convex hull of its ink,
      dilated by 1 px: any linear map moves the ink's bounding box no further than theirs.
  """
  image: np.ndarray
  em: float
  hull: np.ndarray
  ink: int


def _master(path: str, char: str) -> _Master:
  """Renders `char` in the face at `path` at high resolution."""
  em = float(_MASTER_SIZE)
  ink = _render(path, char, em)
  if ink is None:
    raise RuntimeError(f"{path} draws no ink for {_class_name(char)}")
  if max(ink.shape) < 0.75 * _MASTER_SIZE:
    # Small glyphs (".", "~") are redrawn larger rather than magnified into blur.
    em = min(1024.0, _MASTER_SIZE * _MASTER_SIZE / max(ink.shape))
    ink = _render(path, char, em)
  image = np.pad(ink, 2)
  # Each hull corner is the first or last ink pixel of its row.
  inked = _rank3(image, np.maximum) > _INK
  rows = np.flatnonzero(inked.any(1))
  first = inked[rows].argmax(1)
  last = inked.shape[1] - 1 - inked[rows, ::-1].argmax(1)
  hull = np.stack([np.concatenate([first, last]), np.concatenate([rows, rows])]) + 0.5
  return _Master(image=image, em=em, hull=hull, ink=int(image.sum(dtype=np.int64)))


def _draw(master: _Master, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """One image: stroke-width change, then a random affine, fitted and centred in the frame.

  Args:
    master: the glyph.
    image_size: side of the output image, px.
    rng: the per-image randomness.

  Returns:
    [image_size, image_size] uint8; the outermost pixel ring is always 0.
  """
  # Stroke width: erode, keep or dilate by 1 px of the ~96 px master (about +-1/4 output px per
  # side). Outline glyphs ("☞") have hairline strokes that erosion would wipe out, so it is
  # skipped where it would take away more than half of the ink.
  stroke = rng.integers(3)
  glyph = master.image
  if stroke == 0:
    eroded = _rank3(glyph, np.minimum)
    if 2 * eroded.sum(dtype=np.int64) >= master.ink:
      glyph = eroded
  elif stroke == 2:
    glyph = _rank3(glyph, np.maximum)
  angle = math.radians(rng.uniform(-10.0, 10.0))
  shear = rng.uniform(-0.15, 0.15)
  stretch = math.exp(rng.uniform(-0.1, 0.1))  # aspect ratio, area kept
  scale = rng.uniform(0.8, 1.0)  # of the largest size that fits
  shift = rng.uniform(-1.0, 1.0, size=2)

  cos, sin = math.cos(angle), math.sin(angle)
  linear = (np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
            @ np.diag([stretch, 1.0 / stretch]))
  low, high = master.hull.min(1), master.hull.max(1)
  centre = (low + high) / 2
  moved = linear @ (master.hull - centre[:, None])
  extent = moved.max(1) - moved.min(1) + 2.0  # +-1 px: pixels have area
  canvas = image_size * _SUPERSAMPLE
  margin = 2 * _SUPERSAMPLE  # 2 output px of black on every side before the shift
  fit = (canvas - 2 * margin) / extent.max()
  # Glyphs are fitted to the frame, but magnified at most _MAX_MAGNIFY times their size in a font
  # whose em is the frame: a "." stays a dot instead of becoming a disc.
  size = min(fit, _MAX_MAGNIFY * canvas / master.em) * scale
  linear = linear * size
  mid = (moved.min(1) + moved.max(1)) / 2 * size  # ink centre after the transform
  slack = (canvas - extent * size) / 2 - _SUPERSAMPLE  # keeps a 1 px black ring
  offset = canvas / 2 - mid + shift * np.minimum(slack, 2 * _SUPERSAMPLE)

  # PIL's affine maps output pixels back to input pixels.
  (a, b), (c, d) = linear
  det = a * d - b * c
  inverse = np.array([[d, -b], [-c, a]]) / det
  origin = centre - inverse @ offset
  coeffs = (inverse[0, 0], inverse[0, 1], origin[0], inverse[1, 0], inverse[1, 1], origin[1])
  drawn = Image.fromarray(glyph).transform((canvas, canvas), Image.AFFINE, coeffs,
                                           resample=Image.BILINEAR)
  image = np.asarray(drawn.reduce(_SUPERSAMPLE))
  # Hairline glyphs average to grey at this size; stretch every image to a white peak.
  peak = int(image.max())
  if 0 < peak < 255:
    image = ((image.astype(np.uint16) * 255 + peak // 2) // peak).astype(np.uint8)
  return image


class GlyphRecipe(embedded.Recipe):
  """Glyphs: a class is a character of `candidate_characters()` (so at most that many classes),
  chosen one Unicode block in turn; an image is the character in one of the faces that draw it,
  picked at random, with a random stroke width and affine transform. Images are at least 16 px.
  """

  name = "glyphs"
  set_type = GlyphSet
  channels = 1
  default_num_classes = DEFAULT_NUM_CLASSES
  min_image_size = 16

  def max_num_classes(self) -> int:
    return len(candidate_characters())

  def prepare(self) -> str:
    return f"{len(candidate_characters())} candidates"

  def draw_classes(self, num_classes, rng):
    pool = candidate_characters()
    return [pool[i] for i in _choose_classes(pool, num_classes, rng)]

  def class_name(self, label, cls):
    return _class_name(cls[0])

  def draw_images(self, cls, count, image_size, rng):
    char, faces = cls
    images = np.empty((count, image_size, image_size, 1), np.uint8)
    masters = {}
    for k in range(count):
      face = faces[rng.integers(len(faces))]
      if face not in masters:
        masters[face] = _master(face, char)
      images[k, :, :, 0] = _draw(masters[face], image_size, rng)
    return images


RECIPE = GlyphRecipe()
# glyphs.generate(num_classes=640, images_per_class=20, image_size=32, seed=0) -> GlyphSet; the
# default set's splits are 410 / 102 / 128 classes.
generate = RECIPE.generate


if __name__ == "__main__":
  embedded.main(RECIPE)
