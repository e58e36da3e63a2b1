"""On-device augmentation for backbone pretraining: pure jnp functions vmapped over a batch.

A split is held on the accelerator as uint8 (`DeviceImages`) when it fits; a batch is drawn by
index on device and augmented there, so pretraining never waits on the host. The augmentations
are those of the usual few-shot pretraining recipes (random crop with padding, horizontal flip,
colour jitter of brightness, contrast and saturation 0.4, as torchvision's `ColorJitter(0.4,
0.4, 0.4)`, applied in a fixed order rather than a random one), then per-dataset normalisation.
Which ones run is chosen per dataset (`AugmentConfig`): a mirrored glyph is another glyph, so
glyphs are not flipped.

Normalisation follows the dataset. The named datasets keep the constants of the literature
(`NORMALIZATION`), so that results stay comparable with published ones; a user's image folder
has none, and is normalised with the per-channel mean and standard deviation of its own train
split, which every build stores (`builders.PixelStats`, read by `load.normalization`).
Explicit `config.data.augment.mean` / `.std` override either.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax.data.errors import DataError
from metadiff_jax.data.spec import AUGMENTATIONS
from metadiff_jax.errors import ConfigError

# How often each jitted function here was traced (tests assert compile counts).
TRACE_COUNTS: collections.Counter = collections.Counter()

# Per-dataset (mean, std) of the pixels in [0, 1], RGB order; None: the statistics of the
# dataset's own build (its train split), read when a config is resolved (`from_config`).
NORMALIZATION = {
    # miniImageNet constants of the reference backbone (shared/reference/README.md; also
    # those of MetaOptNet and the original MetaDiff code).
    "mini_imagenet": ((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255),
                      (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)),
    # tieredImageNet is normalised with the same constants by MetaOptNet and RFS.
    "tiered_imagenet": ((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255),
                        (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)),
    # CIFAR-100 training-set statistics, as used for CIFAR-FS and FC100 by MetaOptNet and RFS.
    "cifar_fs": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fc100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Measured on the train split of the default glyph set (white glyphs on black).
    "glyphs": ((0.1667,), (0.3440,)),
    # Measured on the train split of the default texture set (384 classes x 20 images, seed 0).
    "textures": ((0.3736, 0.3594, 0.3681), (0.2549, 0.2479, 0.2515)),
    # A user's own images, grayscale or colour, photographs or drawings: their own statistics.
    "image_folder": None,
}


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Which augmentations run, and how strongly.

  Attributes:
    crop_padding: pixels of zero padding before a random crop back to the input size (0: off).
    flip: random horizontal flips.
    brightness, contrast, saturation: colour-jitter strengths s; each factor is drawn
      uniformly from [1 - s, 1 + s] (0: off).
    mean, std: per-channel normalisation of pixels in [0, 1] (length C or 1).
  """

  crop_padding: int = 0
  flip: bool = False
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)


def for_dataset(name: str, **overrides) -> AugmentConfig:
  """The default augmentations (`spec.AUGMENTATIONS`) and normalisation of dataset `name`,
  with overrides.

  A dataset normalised with its build's statistics (`NORMALIZATION[name]` None) needs `mean`
  and `std` among the overrides.
  """
  if name not in AUGMENTATIONS:
    raise ValueError(f"no augmentation defaults for {name!r}; known: {', '.join(AUGMENTATIONS)}")
  constants = NORMALIZATION[name]
  if constants is None and ("mean" not in overrides or "std" not in overrides):
    raise ValueError(f"{name} is normalised with its build's statistics; pass mean= and std= "
                     "(load.normalization(ref))")
  mean, std = constants or (None, None)
  return AugmentConfig(**{**AUGMENTATIONS[name], "mean": mean, "std": std, **overrides})


def from_config(data_config) -> AugmentConfig:
  """AugmentConfig from a config's `data` section (`name`, `augment.*`, optional mean/std).

  mean or std None takes the dataset's constants, or, for a user's image folder, the statistics
  its build stored (which reads the build's metadata: the dataset must be built).

  Raises:
    ConfigError: a mean or std whose length is neither 1 nor the images' channel count, or a
      std that is not positive.
    DataError: an image folder that is not built, or built before its statistics were stored.
  """
  fields = dict(data_config.augment)
  for key in ("mean", "std"):
    if fields.get(key) is None:
      fields.pop(key, None)
  name = data_config.name
  constants = NORMALIZATION.get(name)
  if constants is None and name in NORMALIZATION:
    ref = _dataset_ref(data_config)
    if "mean" not in fields or "std" not in fields:
      from metadiff_jax.data import load  # tensorflow-datasets: only where a build is read
      try:
        load.dataset_dir(ref)
      except DataError as e:
        raise DataError(f"{e} (its normalisation statistics are read from the build; or set "
                        "config.data.augment.mean and .std)") from None
      mean, std = load.normalization(ref)
      # A channel that is constant over the whole train split (std 0) carries nothing to
      # scale; dividing by 1 keeps it finite.
      fields.setdefault("mean", mean)
      fields.setdefault("std", tuple(s if s > 1e-6 else 1.0 for s in std))
      channels = len(mean)
    else:
      channels = _built_channels(ref)
    where = f"the {name} build {ref.config or 'default'!r}"
  else:
    channels = len(constants[0]) if constants else None
    where = f"{name}"
  for key in ("mean", "std"):
    if key in fields:
      fields[key] = _check_values(fields[key], key, channels, where)
  return for_dataset(name, **fields)


def with_build_statistics(config):
  """`config`, or a copy whose data.augment.mean and .std hold the build's statistics where a
  dataset is normalised with them (a user's image folder) and the config leaves them None.

  The stages run on this copy, so the workdir's config.json records the numbers the backbone
  was trained with: `predict` and the importers read them there, without the build, and a
  rebuild with other statistics shows as a changed field (metadiff_jax.workdir).

  Raises:
    DataError, ConfigError: as `from_config`.
  """
  augment = config.data.augment
  if NORMALIZATION.get(config.data.name, ()) is not None or (
      augment.mean is not None and augment.std is not None):
    return config
  resolved = from_config(config.data)
  out = copy.deepcopy(config)
  out.data.augment.mean = tuple(float(x) for x in resolved.mean)
  out.data.augment.std = tuple(float(x) for x in resolved.std)
  return out


def _dataset_ref(data_config):
  from metadiff_jax.data import load
  return load.DatasetRef(data_config.name, data_config.data_dir,
                         data_config.get("builder_config"))


def _built_channels(ref) -> int | None:
  """The channel count of a built dataset; None where it is not built (yet)."""
  from metadiff_jax.data import load  # tensorflow-datasets: only where a build is read
  try:
    return load.image_shape(ref)[-1]
  except DataError:
    return None


def _check_values(values, key: str, channels: int | None, where: str) -> tuple[float, ...]:
  """config.data.augment.mean or .std as floats, one per channel or one for all."""
  field = f"config.data.augment.{key}"
  try:
    values = tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=object)))
  except (TypeError, ValueError):
    raise ConfigError(f"{field} must be a tuple of numbers, got {values!r}") from None
  if channels is not None and len(values) not in (1, channels):
    raise ConfigError(
        f"{field} has {len(values)} values but {where} has {channels}-channel images; give "
        f"{channels} value{'s' if channels > 1 else ''} (or one for all), or leave it None for "
        "the dataset's own statistics")
  if not values or not all(np.isfinite(values)) or (key == "std" and min(values) <= 0):
    raise ConfigError(f"{field} must hold finite numbers{' > 0' if key == 'std' else ''}, got "
                      f"{values!r}")
  return values


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [..., H, W, C] -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """(x - mean) / std per channel; images [..., C] float."""
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def random_crop(key: jax.Array, image: jax.Array, padding: int) -> jax.Array:
  """Zero-pads [H, W, C] by `padding` on each side and crops a random H x W window."""
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  dy, dx = jax.random.randint(key, (2,), 0, 2 * padding + 1)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)


def random_flip(key: jax.Array, image: jax.Array) -> jax.Array:
  """Mirrors [H, W, C] left-right with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)


def grayscale(image: jax.Array) -> jax.Array:
  """ITU-R 601 luma of an RGB [H, W, 3] image as [H, W, 1] (a [H, W, 1] image as is)."""
  if image.shape[-1] == 1:
    return image
  return image @ jnp.asarray([0.299, 0.587, 0.114], image.dtype)[:, None]


def color_jitter(key: jax.Array, image: jax.Array, brightness: float, contrast: float,
                 saturation: float) -> jax.Array:
  """Brightness, then contrast, then saturation jitter of a [H, W, C] image in [0, 1].

  Each factor is uniform in [1 - s, 1 + s]; contrast blends with the mean grey level and
  saturation with the grey image, as torchvision does; the result is clipped to [0, 1].
  """
  kb, kc, ks = jax.random.split(key, 3)

  def factor(k, s):
    return jax.random.uniform(k, (), image.dtype, 1.0 - s, 1.0 + s)

  if brightness:
    image = jnp.clip(image * factor(kb, brightness), 0.0, 1.0)
  if contrast:
    mean = jnp.mean(grayscale(image))
    image = jnp.clip(mean + factor(kc, contrast) * (image - mean), 0.0, 1.0)
  if saturation and image.shape[-1] == 3:
    grey = grayscale(image)
    image = jnp.clip(grey + factor(ks, saturation) * (image - grey), 0.0, 1.0)
  return image


def augment_image(key: jax.Array, image: jax.Array, config: AugmentConfig) -> jax.Array:
  """One uint8 [H, W, C] image -> augmented, normalised float32 [H, W, C]."""
  k_crop, k_flip, k_jitter = jax.random.split(key, 3)
  x = to_float(image)
  if config.crop_padding:
    x = random_crop(k_crop, x, config.crop_padding)
  if config.flip:
    x = random_flip(k_flip, x)
  if config.brightness or config.contrast or config.saturation:
    x = color_jitter(k_jitter, x, config.brightness, config.contrast, config.saturation)
  return normalize(x, config.mean, config.std)


def augment_batch(key: jax.Array, images: jax.Array, config: AugmentConfig) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 [B, H, W, C], an independent draw per image."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: augment_image(k, x, config))(keys, images)


def preprocess(images: jax.Array, config: AugmentConfig) -> jax.Array:
  """The evaluation transform: uint8 -> normalised float32, no randomness."""
  return normalize(to_float(images), config.mean, config.std)


def batch_indices(key: jax.Array, step, num_images: int, batch_size: int) -> jax.Array:
  """[batch_size] image indices of batch `step`: a pure function of (key, step).

  Each epoch is a permutation drawn from `fold_in(key, epoch)`; batch j of an epoch is its
  j-th run of `batch_size` indices (the last partial run is dropped). `step` may be traced.
  """
  epoch, j = jnp.divmod(step, num_images // batch_size)
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_images)
  return jax.lax.dynamic_slice_in_dim(perm, j * batch_size, batch_size)


@functools.partial(jax.jit, static_argnames=("batch_size", "config"))
def draw_batch(images: jax.Array, labels: jax.Array, key: jax.Array, step, batch_size: int,
               config: AugmentConfig) -> tuple[jax.Array, jax.Array]:
  """Batch `step` of a split held on device: indices drawn, gathered and augmented there.

  The split is an argument, not a closed-over constant, so it is never baked into the
  compiled program; call this inside a jitted train step with the split as that step's input.

  Args:
    images: [n, H, W, C] uint8 on device.
    labels: [n] int32 on device.
    key: the run's data key (the augmentation draws use `fold_in(key, step)` streams).
    step: the global step (an int or a traced int).
    batch_size: images per batch.
    config: the augmentations (static).

  Returns:
    (images [B, H, W, C] float32 augmented and normalised, labels [B]).
  """
  TRACE_COUNTS["draw_batch"] += 1
  idx = batch_indices(key, step, images.shape[0], batch_size)
  return augment_batch(augment_key(key, step), images[idx], config), labels[idx]


def augment_key(key: jax.Array, step) -> jax.Array:
  """The augmentation stream of batch `step`, apart from the index stream of `batch_indices`.

  Batches gathered on the host (a split too large for the device) use it too, so they are
  augmented exactly as `draw_batch` would augment them.
  """
  return jax.random.fold_in(jax.random.fold_in(key, 1 << 30), step)


class DeviceImages:
  """A split's uint8 images and labels put on device once, and its batches (`draw_batch`).

  Args:
    images: [n, H, W, C] uint8 host array.
    labels: [n] int host array.
    batch_size: images per batch.
    sharding: where to put the arrays (for example replicated over a mesh, so that every
      device holds the split); None lets JAX choose.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
               sharding=None):
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8, got {images.dtype}")
    if batch_size > len(images):
      raise ValueError(f"batch_size {batch_size} exceeds the split's {len(images)} images")
    self.images = jax.device_put(images, sharding)
    self.labels = jax.device_put(np.asarray(labels, np.int32), sharding)
    self.batch_size = int(batch_size)
    self.steps_per_epoch = len(images) // self.batch_size

  def indices(self, key: jax.Array, step) -> jax.Array:
    """[batch_size] indices of batch `step`."""
    return batch_indices(key, step, self.images.shape[0], self.batch_size)

  def batch(self, key: jax.Array, step, config: AugmentConfig) -> tuple[jax.Array, jax.Array]:
    """Augmented images [B, H, W, C] float32 and labels [B] of batch `step`."""
    return draw_batch(self.images, self.labels, key, step, self.batch_size, config)


def fits_on_device(images: np.ndarray, fraction: float = 0.5) -> bool:
  """Whether a uint8 split takes at most `fraction` of the first device's memory.

  Where the backend does not report memory (CPU), the split is assumed to fit.
  """
  stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
  if not stats or "bytes_limit" not in stats:
    return True
  return images.nbytes <= fraction * stats["bytes_limit"]
