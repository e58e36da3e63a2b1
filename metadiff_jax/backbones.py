"""Image backbones: images [B, H, W, C] (NHWC, float32, already normalised) -> features [B, D].

- `Conv4`: ProtoNet's four conv-BN-ReLU-maxpool blocks; the features are the flattened final
  map (32x32 -> 2x2x64 = 256, 84x84 -> 5x5x64 = 1600).
- `ResNet12`: the few-shot ResNet12 as MetaDiff uses it (64-128-256-512 channels, 512-d
  features), with the wide variant (64-160-320-640, DropBlock 0.1) by `make("resnet12_wide")`.
  Its parameter tree mirrors the PyTorch names, so `pytorch_weights.resnet12_variables_from_torch`
  maps a checkpoint one to one:

    layerL/conv{1,2,3}/kernel    <- layerL.conv{1,2,3}.weight       (L = 1..4; OIHW -> HWIO)
    layerL/bn{1,2,3}/{scale,bias} and batch_stats layerL/bn{1,2,3}/{mean,var}
                                 <- layerL.bn{1,2,3}.{weight,bias,running_mean,running_var}
    layerL/downsample_conv/kernel <- layerL.downsample.0.weight
    layerL/downsample_bn/...     <- layerL.downsample.1.*

BatchNorm statistics live in the `batch_stats` collection: apply with `train=True` and
`mutable=["batch_stats"]` to update them, and with a `dropout` rng where DropBlock is on.

Convolution kernels start as Kaiming-normal in fan-out mode (variance 2 / (kh * kw * out)),
the init of MetaOptNet's ResNet12 and of torchvision's ResNets, so a backbone trained here
starts where the PyTorch recipes start; BatchNorm starts at scale 1, bias 0.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's BatchNorm2d defaults; its momentum 0.1 weighs the new batch, flax's the old average.
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9
_LEAKY_SLOPE = 0.1


def _max_pool_2x2(x):
  # VALID drops an odd last row/column, as PyTorch's MaxPool2d(2) does: 84 -> 42 -> 21 -> 10 -> 5.
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def drop_block(x, rate, block_size: int, rng) -> jnp.ndarray:
  """DropBlock (Ghiasi et al. 2018, Algorithm 1), the training-time branch.

  Seeds are drawn in the region where a whole block fits, at the paper's Eq. 1 rate
  gamma = rate / block^2 * (H W) / ((H - block + 1) (W - block + 1)), independently per
  example and channel (as MetaOptNet's implementation does); each seed zeroes the block x block
  square it is the top-left corner of; the kept units are rescaled by count / count_kept so
  the mean activation is unchanged.

  Args:
    x: [B, H, W, C] activations.
    rate: the fraction of units to drop, in [0, 1) (the paper's 1 - keep_prob).
    block_size: the side of a dropped square; clipped to min(H, W) for small maps.
    rng: a PRNG key.

  Returns:
    [B, H, W, C], x with blocks zeroed and the rest rescaled.
  """
  _, height, width, _ = x.shape
  block = min(block_size, height, width)
  valid_h, valid_w = height - block + 1, width - block + 1
  gamma = rate / block**2 * (height * width) / (valid_h * valid_w)
  seeds = jax.random.bernoulli(rng, gamma, (x.shape[0], valid_h, valid_w, x.shape[3]))
  # Padding by block - 1 and a stride-1 max-pool spreads each seed over its block and gives
  # back an H x W mask.
  pad = ((0, 0), (block - 1, block - 1), (block - 1, block - 1), (0, 0))
  dropped = nn.max_pool(jnp.pad(seeds.astype(x.dtype), pad), (block, block), padding="VALID")
  keep = 1.0 - dropped
  scale = keep.size / jnp.maximum(keep.sum(), 1.0)
  return x * keep * scale.astype(x.dtype)


class _ConvBlock(nn.Module):
  """Conv4's block: 3x3 conv (with bias, as ProtoNet's), BatchNorm, ReLU, 2x2 max-pool."""

  width: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3), padding="SAME", dtype=self.dtype,
                kernel_init=_kaiming_fan_out, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                     dtype=self.dtype, name="bn")(x)
    return _max_pool_2x2(nn.relu(x))


class Conv4(nn.Module):
  """ProtoNet's four-block convolutional backbone.

  Parameters: `layer{1..4}/conv/{kernel,bias}`, `layer{1..4}/bn/{scale,bias}`. The features
  flatten the final map in (H, W, C) order, where PyTorch flattens (C, H, W): the same numbers
  in another order, which distance-based few-shot heads do not see.

  Attributes:
    width: channels of every block.
    dtype: computation dtype (None: that of the inputs); parameters stay float32.
  """

  width: int = 64
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Features of a batch of images.

    Args:
      x: [B, H, W, C] normalised images.
      train: use and update batch statistics instead of the running ones.

    Returns:
      [B, (H // 16) * (W // 16) * width] features.
    """
    _check_images(x)
    for index in range(4):
      x = _ConvBlock(self.width, dtype=self.dtype, name=f"layer{index + 1}")(x, train)
    return x.reshape(x.shape[0], -1)


class _ResidualBlock(nn.Module):
  """One ResNet12 block: three 3x3 conv-BN, a 1x1 conv-BN shortcut, 2x2 max-pool, DropBlock."""

  width: int
  activate_sum: bool
  dropblock_rate: float
  dropblock_size: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda size, name: nn.Conv(  # noqa: E731
        self.width, (size, size), padding=(size - 1) // 2, use_bias=False, dtype=self.dtype,
        kernel_init=_kaiming_fan_out, name=name)
    norm = lambda name: nn.BatchNorm(  # noqa: E731
        use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
        dtype=self.dtype, name=name)
    out = nn.leaky_relu(norm("bn1")(conv(3, "conv1")(x)), _LEAKY_SLOPE)
    out = nn.leaky_relu(norm("bn2")(conv(3, "conv2")(out)), _LEAKY_SLOPE)
    out = norm("bn3")(conv(3, "conv3")(out))
    out = out + norm("downsample_bn")(conv(1, "downsample_conv")(x))
    if self.activate_sum:
      out = nn.leaky_relu(out, _LEAKY_SLOPE)
    out = _max_pool_2x2(out)
    # After the pool, where MetaOptNet's code applies it (MetaDiff's models/resnet12_2.py has
    # no DropBlock): the block size then counts units of the map the next block sees.
    if train and self.dropblock_rate > 0:
      out = drop_block(out, self.dropblock_rate, self.dropblock_size, self.make_rng("dropout"))
    return out


class ResNet12(nn.Module):
  """The ResNet12 of MetaDiff / Meta-Baseline / MetaOptNet (module docstring: parameter names).

  Each of the four blocks: three 3x3 convolutions (no bias, padding 1) with BatchNorm (eps
  1e-5), LeakyReLU(0.1) after the first two, a 1x1 conv + BatchNorm shortcut added after the
  third, LeakyReLU(0.1) after the sum (not in the fourth block unless `activate_last`), a 2x2
  max-pool, and DropBlock in training for the blocks in `dropblock_blocks`. Global average
  pooling of the last map gives the features.

  MetaOptNet ramps the DropBlock rate linearly from 0 over its first 40k steps and also applies
  plain dropout at the same rate in the first two blocks; here the rate is constant and only
  DropBlock is used.

  Attributes:
    widths: the channels of the four blocks; (64, 160, 320, 640) for the wide variant.
    activate_last: LeakyReLU after the fourth block's sum: False for the original MetaDiff's
      checkpoints (its models/resnet12_2.py leaves that sum unactivated), True for
      Meta-Baseline's, MetaOptNet's and FEAT's, whose blocks all activate after the sum
      (docs/IMPORTING.md).
    dropblock_rate: the fraction of units DropBlock drops in training (0 turns it off).
    dropblock_size: the side of a dropped square, in units of the pooled map.
    dropblock_blocks: 0-based indices of the blocks followed by DropBlock.
    dtype: computation dtype (None: that of the inputs); parameters stay float32.
  """

  widths: Sequence[int] = (64, 128, 256, 512)
  activate_last: bool = False
  dropblock_rate: float = 0.0
  dropblock_size: int = 5
  dropblock_blocks: Sequence[int] = (2, 3)
  dtype: Any = None

  def __post_init__(self):
    # Tuples keep the module hashable (a static argument of `jax.jit`); configs may give lists.
    object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
    object.__setattr__(self, "dropblock_blocks", tuple(int(b) for b in self.dropblock_blocks))
    if len(self.widths) != 4:
      raise ValueError(f"ResNet12 has four blocks, got widths={self.widths}")
    if not 0.0 <= self.dropblock_rate < 1.0:
      raise ValueError(f"dropblock_rate must be in [0, 1), got {self.dropblock_rate}")
    super().__post_init__()

  @nn.compact
  def feature_map(self, x, train: bool = False):
    """The last block's output before pooling.

    Args:
      x: [B, H, W, C] normalised images.
      train: use and update batch statistics, and apply DropBlock (needs a `dropout` rng).

    Returns:
      [B, H', W', widths[-1]] with H' = H // 16 (84 -> 5) and W' likewise.
    """
    _check_images(x)
    for index, width in enumerate(self.widths):
      is_last = index == len(self.widths) - 1
      x = _ResidualBlock(
          width,
          activate_sum=self.activate_last or not is_last,
          dropblock_rate=self.dropblock_rate if index in self.dropblock_blocks else 0.0,
          dropblock_size=self.dropblock_size,
          dtype=self.dtype,
          name=f"layer{index + 1}")(x, train)
    return x

  def __call__(self, x, train: bool = False):
    """[B, widths[-1]] features: the global average of `feature_map(x, train)`."""
    return self.feature_map(x, train).mean(axis=(1, 2))


_WIDE_DEFAULTS = dict(widths=(64, 160, 320, 640), dropblock_rate=0.1)
_FACTORIES = {
    "conv4": Conv4,
    "resnet12": ResNet12,
    "resnet12_wide": lambda **kwargs: ResNet12(**(_WIDE_DEFAULTS | kwargs)),
}
NAMES = tuple(_FACTORIES)


def make(name: str, **kwargs) -> nn.Module:
  """Builds a backbone by name ("conv4", "resnet12", "resnet12_wide"); kwargs override."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown backbone {name!r}: use one of {', '.join(NAMES)}")
  return _FACTORIES[name](**kwargs)


def feature_dim(module: nn.Module, image_shape: Sequence[int]) -> int:
  """D, the feature width of `module` for images of shape (H, W, C), from shapes alone."""
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  features, _ = jax.eval_shape(
      lambda x: module.init_with_output(jax.random.key(0), x), images)
  return int(features.shape[-1])


def _check_images(x):
  if x.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C] (NHWC), got shape {x.shape}")
