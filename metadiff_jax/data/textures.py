"""Textures: a synthetic few-shot dataset of procedurally generated colour textures.

The second embedded dataset, of another character than the glyphs and harder: every class is a
random parametric texture (a sum of oriented sinusoidal gratings, warped, sharpened, optionally
masked by stripes or blobs, mapped through a 2- or 3-colour palette), every image a fresh
instance of it (translated, rotated, rescaled, colour-jittered and noisy). It is not a benchmark
from the literature; it needs no download. See docs/TEXTURES.md for the rules and the measured
build time and few-shot accuracies.

Images are evaluated analytically at their pixel positions (no resampling) with numpy's random
generator only, so the set is a pure function of the arguments of `generate` and of numpy's
floating point; key caches on `embedded.fingerprint(texture_set)` all the same.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from metadiff_jax.data import embedded

DEFAULT_NUM_CLASSES = 600  # splits 384 / 96 / 120

_SUPERSAMPLE = 2  # images are evaluated at this multiple of image_size, then box-averaged down

# --- a class ------------------------------------------------------------------------------------
_COMPONENTS = (2, 4)  # gratings per class, inclusive
# Spatial frequency in cycles per pixel of a 32 px image (periods of 5 to 12 px); scaled with
# the image size, so a texture looks the same at any resolution.
_FREQUENCY = (1.0 / 12.0, 1.0 / 5.0)
_SHARPNESS = (1.0, 6.0)  # log-uniform gain before the sigmoid: soft waves to hard-edged bands
_WARP_PROBABILITY = 0.5  # a class's coordinates are bent by a slow sinusoid ...
_WARP_AMPLITUDE = (1.0, 3.0)  # ... of this amplitude, px at 32 px
_MASK_PROBABILITY = 0.5  # a class is masked (half stripes, half blobs) by a third colour
_MASK_FREQUENCY = (1.0 / 24.0, 1.0 / 10.0)
_PALETTE_SIZES = (2, 3)
# Palette colours are drawn from a few shared hues (in the HSV sense) plus jitter, so that many
# classes share their colours and a class is told apart by its pattern, not its colours alone.
_HUES = 3
_HUE_JITTER = 0.03  # of the hue circle
# --- an image of a class ------------------------------------------------------------------------
_ROTATION = 20.0  # degrees, uniform in +-
_SCALE = 0.15  # uniform factor in [1 - s, 1 + s]
_PHASE_JITTER = math.pi  # radians, uniform in +-, per grating on top of the common translation
# Each image also perturbs its class's parameters, grating by grating, so that instances share
# a texture's statistics rather than its exact pattern.
_ORIENTATION_JITTER = 35.0  # degrees, uniform in +-, per grating
_FREQUENCY_JITTER = 0.3  # factor exp(uniform in +-), per grating
_WEIGHT_JITTER = 0.6  # factor uniform in [1 - j, 1 + j], per grating
_SHARPNESS_JITTER = 0.7  # factor exp(uniform in +-)
_HUE_SHIFT = 0.25  # of the hue circle, uniform in +-, the whole palette
_BRIGHTNESS = 0.2  # additive, uniform in +-
_CONTRAST = 0.4  # factor around the image mean, uniform in [1 - c, 1 + c]
_CHANNEL_GAIN = 0.2  # per-channel factor, uniform in [1 - g, 1 + g]
_NOISE = 0.12  # std of Gaussian pixel noise, in [0, 1] units


@dataclasses.dataclass(frozen=True)
class _Texture:
  """The parameters of one class (frequencies in cycles per px of a 32 px image).

  Attributes:
    directions: [k, 2] unit wave vectors of the k gratings.
    frequencies: [k] cycles per px.
    phases: [k] radians.
    weights: [k] positive, summing to 1.
    sharpness: gain applied to the weighted sum before the sigmoid.
    warp: (amplitude px, frequency cycles/px, direction [2], displacement direction [2], phase)
      or None.
    mask: ("stripes" | "blobs", frequency, direction [2], phase, threshold) or None.
    palette: [p, 3] RGB in [0, 1] the pattern runs through; the mask colour is last when masked.
  """
  directions: np.ndarray
  frequencies: np.ndarray
  phases: np.ndarray
  weights: np.ndarray
  sharpness: float
  warp: tuple | None
  mask: tuple | None
  palette: np.ndarray

  def name(self, label: int) -> str:
    parts = [f"{len(self.weights)} gratings"]
    if self.warp is not None:
      parts.append("warped")
    if self.mask is not None:
      parts.append(self.mask[0])
    parts.append(f"{len(self.palette) - (self.mask is not None)} colours")
    return f"texture_{label:04d}: " + ", ".join(parts)


def _unit(angle: np.ndarray | float) -> np.ndarray:
  return np.stack([np.cos(angle), np.sin(angle)], -1)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """[...] hue, saturation, value in [0, 1] -> [..., 3] RGB in [0, 1]."""
  k = (np.asarray([5.0, 3.0, 1.0]) + 6.0 * np.asarray(h)[..., None]) % 6.0
  return np.asarray(v)[..., None] * (
      1.0 - np.asarray(s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _draw_texture(rng: np.random.Generator) -> _Texture:
  """One class's parameters."""
  k = int(rng.integers(_COMPONENTS[0], _COMPONENTS[1] + 1))
  # Orientations spread around the circle from a random start, so gratings rarely coincide.
  angles = rng.uniform(0, math.pi) + np.arange(k) * math.pi / k + rng.uniform(-0.4, 0.4, k)
  frequencies = np.exp(rng.uniform(math.log(_FREQUENCY[0]), math.log(_FREQUENCY[1]), k))
  weights = rng.uniform(0.3, 1.0, k)
  sharpness = float(np.exp(rng.uniform(*np.log(_SHARPNESS))))
  warp = None
  if rng.random() < _WARP_PROBABILITY:
    warp = (float(rng.uniform(*_WARP_AMPLITUDE)), float(rng.uniform(*_MASK_FREQUENCY)),
            _unit(rng.uniform(0, 2 * math.pi)), _unit(rng.uniform(0, 2 * math.pi)),
            float(rng.uniform(0, 2 * math.pi)))
  mask = None
  if rng.random() < _MASK_PROBABILITY:
    mask = ("stripes" if rng.random() < 0.5 else "blobs", float(rng.uniform(*_MASK_FREQUENCY)),
            _unit(rng.uniform(0, math.pi)), float(rng.uniform(0, 2 * math.pi)),
            float(rng.uniform(-0.4, 0.4)))
  colours = int(rng.choice(_PALETTE_SIZES)) + (mask is not None)
  hues = (rng.integers(_HUES, size=colours) / _HUES
          + rng.uniform(-_HUE_JITTER, _HUE_JITTER, colours)) % 1.0
  # Values are spread so that the pattern has contrast: one dark colour and one light one.
  values = rng.uniform(0.15, 1.0, colours)
  values[:2] = [rng.uniform(0.1, 0.45), rng.uniform(0.65, 1.0)]
  values[:2] = values[:2][rng.permutation(2)]
  palette = _hsv_to_rgb(hues, rng.uniform(0.2, 0.9, colours), values)
  return _Texture(directions=_unit(angles), frequencies=frequencies,
                  phases=rng.uniform(0, 2 * math.pi, k), weights=weights / weights.sum(),
                  sharpness=sharpness, warp=warp, mask=mask, palette=palette)


def _palette_lookup(palette: np.ndarray, t: np.ndarray) -> np.ndarray:
  """t [n, h, w] in [0, 1] -> [n, h, w, 3]: piecewise-linear through each image's palette.

  Args:
    palette: [n, 1, 1, p, 3] colours per image.
    t: [n, h, w] positions along the palette.
  """
  p = palette.shape[-2]
  x = t * (p - 1)
  i = np.minimum(x.astype(np.int64), p - 2)[..., None, None]
  frac = (x - i[..., 0, 0])[..., None]
  low = np.take_along_axis(palette, i, -2)[..., 0, :]
  high = np.take_along_axis(palette, i + 1, -2)[..., 0, :]
  return low * (1.0 - frac) + high * frac


def _hue_rotation(shift: np.ndarray) -> np.ndarray:
  """[n] fractions of the hue circle -> [n, 3, 3] rotations of RGB about the grey axis."""
  theta = 2 * math.pi * np.asarray(shift)
  cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
  axis = np.full(3, 1.0 / math.sqrt(3.0))
  cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]],
                    [-axis[1], axis[0], 0.0]])
  return cos * np.eye(3) + sin * cross + (1.0 - cos) * np.outer(axis, axis)


def _draw_images(texture: _Texture, count: int, image_size: int,
                 rng: np.random.Generator) -> np.ndarray:
  """`count` fresh instances of a class.

  Args:
    texture: the class.
    count: images to draw.
    image_size: side of each output image, px.
    rng: the per-image randomness.

  Returns:
    [count, image_size, image_size, 3] uint8.
  """
  unit = image_size / 32.0  # px per px of a 32 px image: patterns scale with the image
  side = image_size * _SUPERSAMPLE
  centres = (np.arange(side) + 0.5) / _SUPERSAMPLE - image_size / 2  # output px, centred
  grid = np.stack(np.meshgrid(centres, centres, indexing="xy"), -1)  # [side, side, 2] (x, y)

  k = len(texture.weights)
  angle = np.radians(rng.uniform(-_ROTATION, _ROTATION, count))
  scale = rng.uniform(1.0 - _SCALE, 1.0 + _SCALE, count) * unit
  shift = rng.uniform(0.0, 64.0, (count, 2))  # px of the texture's own frame: a translation
  phases = texture.phases + rng.uniform(-_PHASE_JITTER, _PHASE_JITTER, (count, k))
  turns = np.radians(rng.uniform(-_ORIENTATION_JITTER, _ORIENTATION_JITTER, (count, k)))
  frequencies = texture.frequencies * np.exp(
      rng.uniform(-_FREQUENCY_JITTER, _FREQUENCY_JITTER, (count, k)))
  weights = texture.weights * rng.uniform(1.0 - _WEIGHT_JITTER, 1.0 + _WEIGHT_JITTER, (count, k))
  sharpness = texture.sharpness * np.exp(rng.uniform(-_SHARPNESS_JITTER, _SHARPNESS_JITTER, count))
  hue_shift = rng.uniform(-_HUE_SHIFT, _HUE_SHIFT, count)
  mask_shift = rng.uniform(0.0, 64.0, (count, 2))
  brightness = rng.uniform(-_BRIGHTNESS, _BRIGHTNESS, count)
  contrast = rng.uniform(1.0 - _CONTRAST, 1.0 + _CONTRAST, count)
  gain = rng.uniform(1.0 - _CHANNEL_GAIN, 1.0 + _CHANNEL_GAIN, (count, 3))
  noise = rng.normal(0.0, _NOISE, (count, image_size, image_size, 3))

  # Texture coordinates of every sample: rotate and scale the image frame, then translate.
  cos, sin = np.cos(angle), np.sin(angle)
  rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [n, 2, 2]
  coords = np.einsum("nij,hwj->nhwi", rotation / scale[:, None, None], grid)  # [n, h, w, 2]
  if texture.warp is not None:
    amplitude, frequency, direction, displacement, phase = texture.warp
    wave = np.sin(2 * math.pi * frequency * (coords + shift[:, None, None]) @ direction + phase)
    coords = coords + amplitude * wave[..., None] * displacement

  # The pattern: weighted gratings, each turned, rescaled and shifted a little per image.
  base = np.arctan2(texture.directions[:, 1], texture.directions[:, 0])
  vectors = frequencies[..., None] * _unit(base + turns)  # [n, k, 2] cycles per px
  waves = 2 * math.pi * np.einsum("nhwi,nki->nhwk", coords + shift[:, None, None], vectors)
  field = np.einsum("nhwk,nk->nhw", np.cos(waves + phases[:, None, None]), weights)
  # Unit variance for random phases.
  field = field / np.sqrt(np.sum(weights ** 2, -1) / 2)[:, None, None]
  t = 1.0 / (1.0 + np.exp(-sharpness[:, None, None] * field))
  palette = _hue_rotation(hue_shift) @ texture.palette[None].transpose(0, 2, 1)  # [n, 3, p]
  palette = np.clip(palette.transpose(0, 2, 1), 0.0, 1.0)[:, None, None]  # [n, 1, 1, p, 3]
  if texture.mask is None:
    rgb = _palette_lookup(palette, t)
  else:
    kind, frequency, direction, phase, threshold = texture.mask
    where = coords + mask_shift[:, None, None]
    if kind == "stripes":
      m = np.cos(2 * math.pi * frequency * where @ direction + phase)
    else:  # a lattice of blobs: the product of two perpendicular gratings
      normal = np.asarray([-direction[1], direction[0]])
      m = (np.cos(2 * math.pi * frequency * where @ direction + phase)
           * np.cos(2 * math.pi * frequency * where @ normal))
    m = 1.0 / (1.0 + np.exp(-8.0 * (m - threshold)))[..., None]
    rgb = m * _palette_lookup(palette[..., :-1, :], t) + (1.0 - m) * palette[..., -1, :]

  # Box-average down, then the per-image photometric jitter and noise.
  rgb = rgb.reshape(count, image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean((2, 4))
  mean = rgb.mean((1, 2, 3), keepdims=True)
  rgb = (mean + contrast[:, None, None, None] * (rgb - mean)) * gain[:, None, None]
  rgb = rgb + brightness[:, None, None, None] + noise
  return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


class TextureRecipe(embedded.Recipe):
  """Textures: a class is a random `_Texture`, an image a fresh instance of it (`_draw_images`).
  Images are at least 8 px. The set is an `embedded.EmbeddedSet` with images [n, H, W, 3]
  uint8 RGB and class names like "texture_0007: 3 gratings, warped, stripes, 2 colours"."""

  name = "textures"
  channels = 3
  default_num_classes = DEFAULT_NUM_CLASSES
  min_image_size = 8

  def draw_classes(self, num_classes, rng):
    return [_draw_texture(rng) for _ in range(num_classes)]

  def class_name(self, label, cls):
    return cls.name(label)

  def draw_images(self, cls, count, image_size, rng):
    return _draw_images(cls, count, image_size, rng)


RECIPE = TextureRecipe()
# textures.generate(num_classes=600, images_per_class=20, image_size=32, seed=0) -> EmbeddedSet;
# the default set's splits are 384 / 96 / 120 classes.
generate = RECIPE.generate


if __name__ == "__main__":
  embedded.main(RECIPE)
