"""The reference ResNet12 (tests/data/official_resnet12_vectors.npz): its vectors and the
recipe of its weights, shared by the backbone and the import tests."""

import numpy as np

from conftest import DATA


def reference_vectors() -> dict:
  """The arrays of official_resnet12_vectors.npz, as a dict."""
  with np.load(DATA / "official_resnet12_vectors.npz") as archive:
    return dict(archive)


def recipe_shape(key, widths=(64, 128, 256, 512), in_channels=3):
  """The shape of a reference ResNet12 state-dict entry, from its name."""
  layer = int(key[len("layer")]) - 1
  out, inp = widths[layer], (widths[layer - 1] if layer else in_channels)
  if key.endswith(".conv1.weight"):
    return (out, inp, 3, 3)
  if key.endswith(("conv2.weight", "conv3.weight")):
    return (out, out, 3, 3)
  if key.endswith("downsample.0.weight"):
    return (out, inp, 1, 1)
  return (out,)


def recipe_state_dict(keys) -> dict:
  """The reference README's recipe: the weights the reference outputs were computed with, under
  their bare PyTorch names (`layer1.conv1.weight`, ...), in the order of `keys`."""
  rng = np.random.default_rng(0)
  state_dict = {}
  for key in map(str, keys):
    shape = recipe_shape(key)
    if len(shape) == 4:
      value = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
    elif key.endswith(".weight") or key.endswith(".running_var"):
      value = 0.75 + 0.5 * rng.random(shape)
    else:  # bias, running_mean
      value = 0.1 * rng.standard_normal(shape)
    state_dict[key] = value.astype(np.float32)
  return state_dict
