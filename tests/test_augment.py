"""On-device augmentation: each transform against its definition, batches by index, no flips
where a config says so, one compile for many steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax.data import augment, spec


def _image(h=6, w=5, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
  x = jnp.asarray(_image(), jnp.float32)
  padded = np.pad(np.asarray(x), ((2, 2), (2, 2), (0, 0)))
  seen = set()
  for i in range(60):
    y = np.asarray(augment.random_crop(jax.random.key(i), x, 2))
    assert y.shape == x.shape
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(padded[dy:dy + 6, dx:dx + 5], y)]
    assert matches, "crop is not a window of the padded image"
    seen.add(matches[0])
  assert len(seen) > 10  # many offsets are drawn


def test_random_flip_mirrors_or_keeps():
  x = jnp.asarray(_image(), jnp.float32)
  outcomes = set()
  for i in range(20):
    y = np.asarray(augment.random_flip(jax.random.key(i), x))
    if np.array_equal(y, np.asarray(x)):
      outcomes.add("same")
    else:
      np.testing.assert_array_equal(y, np.asarray(x)[:, ::-1])
      outcomes.add("flipped")
  assert outcomes == {"same", "flipped"}


def test_color_jitter_matches_its_formulas():
  x = jnp.asarray(_image(), jnp.float32) / 255
  key = jax.random.key(3)
  y = augment.color_jitter(key, x, 0.4, 0.4, 0.4)
  kb, kc, ks = jax.random.split(key, 3)
  fb, fc, fs = (jax.random.uniform(k, (), jnp.float32, 0.6, 1.4) for k in (kb, kc, ks))
  grey = lambda im: im @ jnp.asarray([0.299, 0.587, 0.114])[:, None]
  z = jnp.clip(x * fb, 0, 1)
  m = jnp.mean(grey(z))
  z = jnp.clip(m + fc * (z - m), 0, 1)
  g = grey(z)
  z = jnp.clip(g + fs * (z - g), 0, 1)
  np.testing.assert_allclose(y, z, atol=1e-6)
  assert float(y.min()) >= 0 and float(y.max()) <= 1
  # Zero strengths are the identity; saturation leaves a one-channel image alone.
  np.testing.assert_allclose(augment.color_jitter(key, x, 0, 0, 0), x)
  g1 = x[..., :1]
  np.testing.assert_allclose(augment.color_jitter(key, g1, 0, 0, 0.4), g1)


def test_normalisation_constants_and_preprocess():
  mean, std = augment.NORMALIZATION["mini_imagenet"]
  np.testing.assert_allclose(mean, np.array([120.39586422, 115.59361427, 104.54012653]) / 255)
  cfg = augment.AugmentConfig(mean=mean, std=std)
  x = _image()
  np.testing.assert_allclose(augment.preprocess(jnp.asarray(x), cfg),
                             (x / 255.0 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)


def test_augment_batch_draws_independently_and_respects_no_flip():
  images = np.stack([_image(8, 8, 1, seed=0)] * 16)  # one image 16 times
  cfg = augment.AugmentConfig(crop_padding=0, flip=False, brightness=0.4)
  out = np.asarray(augment.augment_batch(jax.random.key(0), jnp.asarray(images), cfg))
  assert out.shape == images.shape and out.dtype == np.float32
  assert len({o.tobytes() for o in out}) == 16  # a different brightness per image
  # No flip and no crop: every output is a brightness-scaled (clipped) copy, never mirrored.
  x = images[0] / 255.0
  for o in out:
    unclipped = (x > 0.05) & (o < 0.999)
    f = np.median(o[unclipped] / x[unclipped])
    np.testing.assert_allclose(o, np.clip(x * f, 0, 1), atol=1e-5)


def test_device_images_batches_are_epoch_permutations_and_compile_once():
  n, bsz = 20, 6
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
  labels = np.arange(n) % 5
  data = augment.DeviceImages(images, labels, bsz)
  assert data.steps_per_epoch == 3
  key = jax.random.key(0)
  cfg = augment.AugmentConfig()
  before = augment.TRACE_COUNTS["draw_batch"]
  seen = []
  for s in range(3):
    idx = np.asarray(data.indices(key, s))
    x, y = data.batch(key, jnp.asarray(s), cfg)
    np.testing.assert_allclose(np.asarray(x)[:, 0, 0, 0], idx / 255.0, atol=1e-6)  # by index
    np.testing.assert_array_equal(np.asarray(y), labels[idx])
    seen.extend(idx.tolist())
  assert len(set(seen)) == 18  # one epoch: no index twice
  np.testing.assert_array_equal(np.asarray(data.indices(key, 1)), seen[6:12])  # pure in step
  assert augment.TRACE_COUNTS["draw_batch"] - before == 1  # one compile for every step

  # Inside a user's jitted step, with the split as an argument: the same batches.
  @jax.jit
  def train_step(images, labels, step):
    return augment.draw_batch(images, labels, key, step, bsz, cfg)

  x2, y2 = train_step(data.images, data.labels, 2)
  np.testing.assert_array_equal(np.asarray(y2), labels[np.asarray(data.indices(key, 2))])
  with pytest.raises(ValueError, match="uint8"):
    augment.DeviceImages(images.astype(np.float32), labels, 4)


def test_fits_on_device_on_cpu():
  assert augment.fits_on_device(np.zeros((2, 2), np.uint8))


def test_per_dataset_defaults_and_the_config_section():
  from metadiff_jax import config_lib
  config = config_lib.base_config("glyphs", "conv4")
  glyphs = augment.from_config(config.data)
  assert config.data.name == "glyphs" and not glyphs.flip  # a mirrored glyph is another glyph
  assert glyphs.mean == augment.NORMALIZATION["glyphs"][0]
  mini = augment.for_dataset("mini_imagenet")
  assert mini.flip and mini.crop_padding == 8 and mini.saturation == 0.4
  assert mini.mean == augment.NORMALIZATION["mini_imagenet"][0]
  assert augment.for_dataset("cifar_fs", flip=False).flip is False
  config.data.augment.mean = (0.5,)
  assert augment.from_config(config.data).mean == (0.5,)
  assert set(spec.AUGMENTATIONS) == set(augment.NORMALIZATION)
  with pytest.raises(ValueError, match="no augmentation defaults for 'omniglot'"):
    augment.for_dataset("omniglot")
