"""Shared fixtures: the reference vectors of the original PyTorch MetaDiff (see tests/data)."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import schedule, tcunet, torch_import

DATA = pathlib.Path(__file__).parent / "data"
REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="session")
def ref():
  """The arrays of official_metadiff_vectors.npz, as a dict."""
  with np.load(DATA / "official_metadiff_vectors.npz") as archive:
    return dict(archive)


@pytest.fixture(scope="session")
def ref_state_dict(ref):
  """The original denoiser's parameters under their bare PyTorch names."""
  return {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}


@pytest.fixture(scope="session")
def ref_model(ref_state_dict):
  """(TCUNet, variables) holding the reference parameters."""
  params = torch_import.tcunet_params_from_torch(ref_state_dict)
  model = tcunet.TCUNet(**torch_import.tcunet_config_from_params(params))
  return model, {"params": params}


@pytest.fixture(scope="session")
def ref_schedule():
  return schedule.linear(num_steps=1000, beta_start=1e-4, beta_end=0.02)


def episode(ref, shots, name):
  """One reference array of the K-shot block, with integer arrays as int32."""
  value = ref[f"k{shots}/{name}"]
  return jnp.asarray(value, jnp.int32) if value.dtype.kind == "i" else jnp.asarray(value)


def assert_close_to_scale(actual, expected, tol):
  """max |actual - expected| <= tol * max |expected|."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.abs(expected).max()), 1e-12)
  err = float(np.abs(actual - expected).max())
  assert err <= tol * scale, f"max abs error {err:.3g} > {tol} * scale {scale:.3g}"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A tiny glyph dataset (40 classes of 20 images, 16 x 16) built once per session."""
  from metadiff_jax.data import builders  # tensorflow-datasets: only for the tests that build
  path = tmp_path_factory.mktemp("tfds")
  config = builders.GlyphsConfig(name="tiny", num_classes=40, images_per_class=20,
                                 image_size=16)
  builders.build(builders.make_builder("glyphs", str(path), config=config))
  return str(path)
