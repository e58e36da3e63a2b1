"""What every embedded set (glyphs, textures) must do: determinism, shapes, splits, digest,
mosaic, argument checks, and a tiny TFDS build read back by the loader.

What makes each set itself is tested in test_glyphs.py and test_textures.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import numpy as np
import pytest

from metadiff_jax.data import builders, embedded, episodes, glyphs, load, textures
from metadiff_jax.data.spec import SPLITS

MODULES = {"glyphs": glyphs, "textures": textures}
# The small set each test draws: glyphs at the default 32 px, textures at 16 px.
SMALL = {"glyphs": dict(num_classes=50, images_per_class=4, seed=0),
         "textures": dict(num_classes=25, images_per_class=4, image_size=16, seed=0)}
# Arguments `generate` refuses, beyond the ones every set refuses (below).
BAD = {"glyphs": [dict(num_classes=10**6)], "textures": []}
# The default sets' split sizes (round(0.64 n) / round(0.16 n) / the rest).
DEFAULT_SPLITS = {"glyphs": [410, 102, 128], "textures": [384, 96, 120]}


@pytest.fixture(scope="module", params=sorted(MODULES))
def case(request):
  """The dataset's name, module, small-set arguments and small set."""
  module = MODULES[request.param]
  args = SMALL[request.param]
  return types.SimpleNamespace(name=request.param, module=module, args=args,
                               small=module.generate(**args))


def test_same_arguments_give_identical_sets(case):
  again = case.module.generate(**case.args)
  assert type(again) is type(case.small) and isinstance(again, embedded.EmbeddedSet)
  assert np.array_equal(case.small.images, again.images)
  assert np.array_equal(case.small.labels, again.labels)
  assert case.small.class_names == again.class_names
  for name in SPLITS:
    assert np.array_equal(case.small.splits[name], again.splits[name])
  assert embedded.fingerprint(case.small) == embedded.fingerprint(again)


def test_another_seed_gives_another_set(case):
  other = case.module.generate(**{**case.args, "seed": 1})
  assert not np.array_equal(other.images, case.small.images)
  assert embedded.fingerprint(other) != embedded.fingerprint(case.small)


def test_more_images_per_class_keeps_classes_and_splits(case):
  more = case.module.generate(**{**case.args, "images_per_class": 6})
  assert more.class_names == case.small.class_names
  for name in SPLITS:
    assert np.array_equal(more.splits[name], case.small.splits[name])
  assert embedded.fingerprint(more) != embedded.fingerprint(case.small)


def test_shapes_dtypes_and_labels(case):
  n, per_class = case.args["num_classes"], case.args["images_per_class"]
  size = case.args.get("image_size", 32)
  channels = case.module.RECIPE.channels
  assert case.small.images.shape == (n * per_class, size, size, channels)
  assert case.small.images.dtype == np.uint8
  assert case.small.labels.dtype == np.int64
  assert np.array_equal(case.small.labels, np.repeat(np.arange(n), per_class))
  assert len(case.small.class_names) == case.small.num_classes == n
  assert len(set(case.small.class_names)) == n


def test_splits_are_disjoint_sorted_and_about_64_16_20(case):
  n = case.args["num_classes"]
  parts = [case.small.splits[name] for name in SPLITS]
  assert [len(p) for p in parts] == [round(0.64 * n), round(0.16 * n),
                                     n - round(0.64 * n) - round(0.16 * n)]
  for part in parts:
    assert part.dtype == np.int64 and np.array_equal(part, np.sort(part))
  assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_default_split_counts(case):
  assert case.module.RECIPE.default_num_classes == case.module.DEFAULT_NUM_CLASSES
  splits = embedded.split_classes(case.module.DEFAULT_NUM_CLASSES, np.random.default_rng(0))
  assert [len(splits[name]) for name in SPLITS] == DEFAULT_SPLITS[case.name]


def test_fingerprint_sees_one_pixel(case):
  images = case.small.images.copy()
  middle = images.shape[1] // 2
  images[0, middle, middle, 0] ^= 1
  changed = dataclasses.replace(case.small, images=images)
  assert embedded.fingerprint(changed) != embedded.fingerprint(case.small)
  assert len(embedded.fingerprint(case.small)) == 16


def test_bad_arguments_raise(case):
  too_small = case.module.RECIPE.min_image_size - 1
  for bad in [dict(num_classes=0), dict(num_classes=2, images_per_class=0),
              dict(num_classes=2, image_size=too_small)] + BAD[case.name]:
    with pytest.raises(ValueError):
      case.module.generate(**bad)


def test_grid_shape(case):
  mosaic = embedded.grid(case.small, num_classes=10, images_per_class=4, zoom=1)
  cell = case.small.images.shape[1] + 2
  channels = case.small.images.shape[-1]
  want = (5 * cell, 2 * 4 * cell + 3 * cell // 2)  # 5 rows; 2 columns of 4 and a gap of 1.5
  assert mosaic.dtype == np.uint8
  assert mosaic.shape == (want if channels == 1 else (*want, channels))


def test_tiny_tfds_build_reads_back_with_the_loader(case, tmp_path):
  config = builders.EmbeddedConfig(name="tiny", num_classes=12, images_per_class=3,
                                   image_size=16)
  builder = builders.make_builder(case.name, str(tmp_path), config=config)
  path = builders.build(builder)
  assert os.path.isdir(path)
  expected = case.module.generate(num_classes=12, images_per_class=3, image_size=16)
  with open(os.path.join(path, "metadata.json")) as f:
    metadata = json.load(f)
  assert metadata[f"{case.name}_fingerprint"] == embedded.fingerprint(expected)
  ref = load.DatasetRef(case.name, str(tmp_path), "tiny")
  channels = case.module.RECIPE.channels
  for split in SPLITS:
    data = load.load_split(ref, split, progress=False)
    classes = expected.splits[split]
    assert data.class_names == tuple(expected.class_names[c] for c in classes)
    assert data.images.shape == (3 * len(classes), 16, 16, channels)
    assert data.images.dtype == np.uint8
    keep = np.isin(expected.labels, classes)
    np.testing.assert_array_equal(data.images, expected.images[keep])
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(len(classes)), 3))
    np.testing.assert_array_equal(load.split_labels(ref, split), data.labels)
  data = load.load_split(ref, "train", progress=False)
  ep = episodes.EpisodeSampler(data.labels, 2, 1, 1, seed=0, split="train").batch(0, 2)
  np.testing.assert_array_equal(data.labels[ep.support], np.take_along_axis(
      ep.classes, ep.support_labels, axis=1))
  assert "--manual_dir" not in ref.build_command()
