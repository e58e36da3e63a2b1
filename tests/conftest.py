"""Shared fixtures: the reference vectors of the original PyTorch MetaDiff (see tests/data),
the tiny glyph dataset, a trained tiny workdir and the tiny pipeline run from the command line;
the run's compilation cache; the `slow` marks.

`python -m pytest -q` runs the whole suite in two pytest-xdist worker processes (setup.cfg's
addopts; `-n 0` runs it in this process). `python -m pytest -q -m "not slow"` is the fast
subset for the edit-test loop: it leaves out the tests of a trained run and the other long
ones. A fixture that builds something expensive for many test files (`data_dir`,
`trained_workdir`, `cli_run`) is built once for the whole run (`built_once`), not once per
worker.
"""

import fcntl
import os
import pathlib
import shutil
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import schedule, tcunet, pytorch_weights

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
  params = pytorch_weights.tcunet_params_from_torch(ref_state_dict)
  model = tcunet.TCUNet(**pytorch_weights.tcunet_config_from_params(params))
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


# ----------------------------------------------------------------------------- the session

_OWN_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
  """One persistent compilation cache for the whole run.

  This process, the xdist workers and every subprocess a test starts (they inherit the
  environment) load a program that another of them compiled instead of compiling it again.
  The cache holds the executables XLA built, keyed by the program and the compiler's options,
  so results are bit-identical. A JAX_COMPILATION_CACHE_DIR set beforehand is used and kept
  (to carry the cache from one run to the next); otherwise a fresh directory lives for the
  run. The xdist workers start after this hook of the main process, with its environment.
  """
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="metadiff_jax_xla_")
    config.stash[_OWN_CACHE] = os.environ["JAX_COMPILATION_CACHE_DIR"]
  # Every program, however quick to compile or small: the tests compile thousands.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  # The tests check what the programs compute, not how fast XLA's code for them runs, and on
  # the tiny configs compiling is most of the time: LLVM's optimisation level 0 about halves
  # it. XLA's own (HLO) passes, fusion among them, run as always. A user's XLA_FLAGS that
  # names a level is kept. Set before any test touches a backend, so that this process, the
  # workers and the subprocesses all compile alike.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
  # Several test processes may share one GPU: none takes most of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  # jax read the environment when conftest imported it: tell this process too.
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
  shutil.rmtree(config.stash.get(_OWN_CACHE, ""), ignore_errors=True)


# Fixtures that train or run the tiny pipeline (tens of seconds each on two cores, once per
# run): a test that uses one is slow.
TRAINED_RUNS = ("trained_workdir", "cli_run", "upstream", "analysed", "studied")


def pytest_collection_modifyitems(items):
  """Marks `slow` every test that uses a fixture of TRAINED_RUNS, so that the fast subset,
  `-m "not slow"`, leaves out what waits for a trained run; other long tests carry the mark
  themselves.

  Under pytest-xdist the files that hold slow tests go first (each file's tests kept
  together and in order), so that the two workers do not end on one long test.
  """
  for item in items:
    if set(TRAINED_RUNS) & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)
  if "PYTEST_XDIST_WORKER" in os.environ:
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_files)  # stable


def built_once(tmp_path_factory, name, build):
  """A directory that `build(path)` fills, built once for the whole run.

  Under pytest-xdist the workers share it: the first to ask builds it while any other that
  asks waits for it; without xdist it is the session's own. The tests read it; a test that
  changes it works on a copy (`shutil.copytree`).

  Returns:
    The directory, as a string.
  """
  root = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    root = root.parent  # the run's directory, above each worker's own
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)  # what a failed build left
      path.mkdir()
      build(str(path))
      done.touch()
  return str(path)


def build_tiny(path, dataset, **sizes):
  """A tiny build of an embedded dataset ("glyphs" or "textures") named "tiny" in `path`;
  `sizes` are its builder config's num_classes, images_per_class, image_size."""
  from metadiff_jax.data import builders  # tensorflow-datasets: only for the tests that build
  builders.build(builders.make_builder(
      dataset, str(path), config=builders.EmbeddedConfig(name="tiny", **sizes)))
  return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A tiny glyph dataset (40 classes of 20 images, 16 x 16) built once for the run."""
  return built_once(tmp_path_factory, "glyphs", lambda path: build_tiny(
      path, "glyphs", num_classes=40, images_per_class=20, image_size=16))


@pytest.fixture(scope="session")
def trained_workdir(data_dir, tmp_path_factory):
  """A workdir of the tiny glyph pipeline trained long enough to classify well: 10 epochs of
  pretraining, 1- and 5-shot denoisers of 200 steps, and their evaluation (about 45 s on two
  CPU cores; tests/tiny_pipeline.py's config otherwise). Tests only read it."""
  from metadiff_jax import stages  # pylint: disable=g-import-not-at-top
  from tiny_pipeline import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir, pretrain__epochs=10, pretrain__lr_decay_epochs=(9,),
                       train__shots=(1, 5), train__steps=200, train__learning_rate=1e-3,
                       train__steps_per_call=50, train__val_every_steps=100,
                       train__checkpoint_every_steps=100, train__ema_start_step=100)
  return built_once(tmp_path_factory, "trained", lambda path: stages.run(config, path))


# The eval stage of `cli_run` skips the held-out noise error (its compilation is most of the
# stage; the 2-process run of tests/test_scaling.py computes it from the command line).
CLI_RUN_OVERRIDES = ("--config.eval.diagnostic_episodes=0",)


@pytest.fixture(scope="session")
def cli_run(data_dir, tmp_path_factory):
  """The tiny glyph pipeline run from the command line on one CPU device (glyphs_conv4.py,
  tiny_pipeline.TINY_OVERRIDES and CLI_RUN_OVERRIDES), built once for the run. Tests only
  read it.

  Returns:
    A namespace: workdir, a pathlib.Path; stdout and stderr, the command's.
  """
  from tiny_pipeline import run_tiny  # pylint: disable=g-import-not-at-top

  def build(path):
    proc = run_tiny("glyphs_conv4.py", os.path.join(path, "run"), data_dir,
                    *CLI_RUN_OVERRIDES, devices=1)
    pathlib.Path(path, "stdout.txt").write_text(proc.stdout)
    pathlib.Path(path, "stderr.txt").write_text(proc.stderr)

  root = pathlib.Path(built_once(tmp_path_factory, "cli_run", build))
  return types.SimpleNamespace(workdir=root / "run", stdout=(root / "stdout.txt").read_text(),
                               stderr=(root / "stderr.txt").read_text())
