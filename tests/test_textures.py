"""The procedural texture set: determinism, shapes, splits, images, and a tiny TFDS build."""

import dataclasses
import json
import os

import numpy as np
import pytest

from metadiff_jax.data import augment, builders, episodes, load, textures


@pytest.fixture(scope="module")
def small():
  return textures.generate(num_classes=25, images_per_class=4, image_size=16, seed=0)


def test_same_arguments_give_identical_sets(small):
  again = textures.generate(num_classes=25, images_per_class=4, image_size=16, seed=0)
  assert np.array_equal(small.images, again.images)
  assert np.array_equal(small.labels, again.labels)
  assert small.class_names == again.class_names
  for name in textures.SPLITS:
    assert np.array_equal(small.splits[name], again.splits[name])
  assert textures.fingerprint(small) == textures.fingerprint(again)


def test_another_seed_gives_another_set(small):
  other = textures.generate(num_classes=25, images_per_class=4, image_size=16, seed=1)
  assert not np.array_equal(other.images, small.images)
  assert textures.fingerprint(other) != textures.fingerprint(small)


def test_more_images_per_class_keeps_classes_and_splits(small):
  more = textures.generate(num_classes=25, images_per_class=6, image_size=16, seed=0)
  assert more.class_names == small.class_names
  for name in textures.SPLITS:
    assert np.array_equal(more.splits[name], small.splits[name])
  assert textures.fingerprint(more) != textures.fingerprint(small)


def test_shapes_dtypes_and_labels(small):
  assert small.images.shape == (100, 16, 16, 3) and small.images.dtype == np.uint8
  assert small.labels.dtype == np.int64
  assert np.array_equal(small.labels, np.repeat(np.arange(25), 4))
  assert len(small.class_names) == small.num_classes == 25
  assert len(set(small.class_names)) == 25
  assert all(name.startswith(f"texture_{i:04d}: ") for i, name in enumerate(small.class_names))


def test_splits_are_disjoint_sorted_and_about_64_16_20(small):
  parts = [small.splits[name] for name in textures.SPLITS]
  assert [len(p) for p in parts] == [16, 4, 5]
  for part in parts:
    assert part.dtype == np.int64 and np.array_equal(part, np.sort(part))
  assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(25))


def test_default_split_counts():
  splits = textures._split_classes(textures.DEFAULT_NUM_CLASSES, np.random.default_rng(0))
  assert [len(splits[name]) for name in textures.SPLITS] == [384, 96, 120]


def test_images_are_coloured_patterned_and_vary_within_a_class(small):
  x = small.images.astype(np.float64)
  assert (x.reshape(len(x), -1).std(1) > 5).all()  # no flat images
  assert (np.abs(x - x.mean(-1, keepdims=True)).mean((1, 2, 3)) > 1).mean() > 0.9  # colour
  for label in range(small.num_classes):  # fresh instances, not copies
    images = x[small.labels == label]
    assert not np.array_equal(images[0], images[1])


def test_fingerprint_sees_one_pixel(small):
  images = small.images.copy()
  images[0, 8, 8, 0] ^= 1
  changed = dataclasses.replace(small, images=images)
  assert textures.fingerprint(changed) != textures.fingerprint(small)
  assert len(textures.fingerprint(small)) == 16


def test_bad_arguments_raise():
  with pytest.raises(ValueError):
    textures.generate(num_classes=0)
  with pytest.raises(ValueError):
    textures.generate(num_classes=2, images_per_class=0)
  with pytest.raises(ValueError):
    textures.generate(num_classes=2, image_size=4)


def test_grid_shape(small):
  mosaic = textures.grid(small, num_classes=10, images_per_class=4, zoom=1)
  assert mosaic.dtype == np.uint8 and mosaic.shape == (5 * 18, 2 * 4 * 18 + 27, 3)


def test_augmentation_defaults_exist():
  config = augment.for_dataset("textures")
  assert len(config.mean) == len(config.std) == 3 and config.flip


def test_tiny_tfds_build_reads_back_with_the_loader(tmp_path):
  config = builders.TexturesConfig(name="tiny", num_classes=12, images_per_class=3, image_size=16)
  builder = builders.make_builder("textures", str(tmp_path), config=config)
  path = builders.build(builder)
  assert os.path.isdir(path)
  expected = textures.generate(num_classes=12, images_per_class=3, image_size=16)
  with open(os.path.join(path, "metadata.json")) as f:
    metadata = json.load(f)
  assert metadata["textures_fingerprint"] == textures.fingerprint(expected)
  ref = load.DatasetRef("textures", str(tmp_path), "tiny")
  for split in textures.SPLITS:
    data = load.load_split(ref, split, progress=False)
    classes = expected.splits[split]
    assert data.class_names == tuple(expected.class_names[c] for c in classes)
    assert data.images.shape == (3 * len(classes), 16, 16, 3) and data.images.dtype == np.uint8
    keep = np.isin(expected.labels, classes)
    np.testing.assert_array_equal(data.images, expected.images[keep])
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(len(classes)), 3))
  data = load.load_split(ref, "train", progress=False)
  ep = episodes.EpisodeSampler(data.labels, 2, 1, 1, seed=0, split="train").batch(0, 2)
  np.testing.assert_array_equal(data.labels[ep.support], np.take_along_axis(
      ep.classes, ep.support_labels, axis=1))
  assert "--manual_dir" not in ref.build_command()
