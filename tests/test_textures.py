"""The texture set: its class names, its images and its augmentation defaults (what every
embedded set must do is tested in test_embedded_datasets.py)."""

import numpy as np
import pytest

from metadiff_jax.data import augment, textures


@pytest.fixture(scope="module")
def small():
  return textures.generate(num_classes=25, images_per_class=4, image_size=16, seed=0)


def test_classes_are_named_by_index_and_parameters(small):
  assert all(name.startswith(f"texture_{i:04d}: ") for i, name in enumerate(small.class_names))


def test_images_are_coloured_patterned_and_vary_within_a_class(small):
  x = small.images.astype(np.float64)
  assert (x.reshape(len(x), -1).std(1) > 5).all()  # no flat images
  assert (np.abs(x - x.mean(-1, keepdims=True)).mean((1, 2, 3)) > 1).mean() > 0.9  # colour
  for label in range(small.num_classes):  # fresh instances, not copies
    images = x[small.labels == label]
    assert not np.array_equal(images[0], images[1])


def test_augmentation_defaults_exist():
  config = augment.for_dataset("textures")
  assert len(config.mean) == len(config.std) == 3 and config.flip
