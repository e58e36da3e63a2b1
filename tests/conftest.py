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
def resnet_ref():
  """The arrays of official_resnet12_vectors.npz, as a dict."""
  from resnet_recipe import reference_vectors  # pylint: disable=g-import-not-at-top
  return reference_vectors()


@pytest.fixture(scope="session")
def resnet_state_dict(resnet_ref):
  """The reference README's recipe: the weights the reference outputs were computed with,
  under their bare PyTorch names (`layer1.conv1.weight`, ...)."""
  from resnet_recipe import recipe_state_dict  # pylint: disable=g-import-not-at-top
  return recipe_state_dict(resnet_ref["keys"])


def build_tiny(tmp_path_factory, dataset, **sizes):
  """A tiny build of an embedded dataset ("glyphs" or "textures") named "tiny" in a fresh
  directory; `sizes` are its builder config's num_classes, images_per_class, image_size."""
  from metadiff_jax.data import builders  # tensorflow-datasets: only for the tests that build
  path = tmp_path_factory.mktemp(dataset)
  config_class = {"glyphs": builders.GlyphsConfig, "textures": builders.TexturesConfig}[dataset]
  builders.build(builders.make_builder(dataset, str(path), config=config_class(name="tiny",
                                                                               **sizes)))
  return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A tiny glyph dataset (40 classes of 20 images, 16 x 16) built once per session."""
  return build_tiny(tmp_path_factory, "glyphs", num_classes=40, images_per_class=20,
                    image_size=16)


@pytest.fixture(scope="session")
def trained_workdir(data_dir, tmp_path_factory):
  """A workdir of the tiny glyph pipeline trained long enough to classify well: 10 epochs of
  pretraining, 1- and 5-shot denoisers of 200 steps, and their evaluation (about 45 s on two
  CPU cores; tests/tiny_pipeline.py's config otherwise). Tests only read it."""
  from metadiff_jax import stages  # pylint: disable=g-import-not-at-top
  from tiny_pipeline import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = tiny_config(data_dir, pretrain__epochs=10, pretrain__lr_decay_epochs=(9,),
                       train__shots=(1, 5), train__steps=200, train__learning_rate=1e-3,
                       train__steps_per_call=50, train__val_every_steps=100,
                       train__checkpoint_every_steps=100, train__ema_start_step=100)
  stages.run(config, workdir)
  return workdir
