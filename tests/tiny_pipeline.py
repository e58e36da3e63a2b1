"""The tiny pipeline the tests run: its config, overrides and command line (run, or parsed in
this process), and the per-query scores of a finished run."""

import os
import subprocess
import sys

import pytest
from absl import flags

from conftest import REPO
from metadiff_jax import checks, config_flag, config_lib
from metadiff_jax.errors import ConfigError


def load_config(name, arg=None):
  """`get_config(arg)` of configs/NAME.py, as `--config=configs/NAME.py[:ARG]` reads it."""
  return config_lib.read_config_file(str(REPO / "configs" / f"{name}.py"), arg, pass_arg=True)


# The tiny preset (config_lib.TINY, `:tiny=1` after a config file) as `--config.*` overrides,
# for command lines that add them to another preset or pass them on (`--override=`).
TINY_OVERRIDES = [f"--config.{field}={value}" for field, value in config_lib.TINY.items()]


def tiny_config(data_dir, config_name="glyphs_conv4", builder_config="tiny", **sections):
  """A config file's config (glyphs_conv4 by default) with the tiny preset (`:tiny=1`), on the
  build `builder_config` in `data_dir`; `sections` maps 'train__steps' style names to values."""
  config = load_config(config_name, "tiny=1")
  config.data.data_dir = data_dir
  config.data.builder_config = builder_config
  for name, value in sections.items():
    section, field = name.split("__")
    config[section][field] = value
  return config


def parse_command(*args):
  """The config `python -m metadiff_jax.main ARGS` runs, parsed in this process as
  `main._parse_flags` parses it, on flags of its own (so that a test may parse many), with
  relative paths read from the repository; or, for a mistake, the one line the command ends
  with (after `error: `). `checks.check(config)` is what the command checks next.

  Args:
    *args: `--config=...` and `--config.*=...` arguments.
  """
  argv = ["metadiff_jax.main", *args]
  flag_values = flags.FlagValues()
  holder = config_flag.define(flag_values, sys_argv=argv)
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    flag_values(argv)
    config_flag.check_overrides(flag_values)
  except Exception as e:  # noqa: BLE001  (what main._parse_flags catches)
    return config_flag.error_line(e)
  finally:
    os.chdir(cwd)
  return holder.value


def command_error(*args):
  """The one line `python -m metadiff_jax.main ARGS` stops with before any stage (after
  `error: `): a mistake in its flags or config, found in this process as the command finds
  it (`parse_command`, then `checks.check`); None where there is none."""
  config = parse_command(*args)
  if isinstance(config, str):
    return config
  try:
    checks.check(config)
  except ConfigError as e:
    return str(e)
  return None


def main_command(*args):
  return [sys.executable, "-m", "metadiff_jax.main", *args]


def xla_flags(devices):
  """This process's XLA_FLAGS (conftest's) with `devices` simulated CPU devices."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


def cpu_env(devices=None, **extra):
  """The environment of a CPU-only run, with `devices` simulated devices if given."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  if devices:
    env["XLA_FLAGS"] = xla_flags(devices)
  return env


def run_main(*args, timeout=600, devices=None):
  """`python -m metadiff_jax.main ARGS` on the CPU; the finished process."""
  return subprocess.run(main_command(*args), cwd=REPO, env=cpu_env(devices),
                        capture_output=True, text=True, timeout=timeout)


def run_tiny(config, workdir, data_dir, *overrides, timeout=900, devices=None):
  """`python -m metadiff_jax.main --config=configs/CONFIG` with TINY_OVERRIDES on the tiny
  glyphs in `data_dir`, in `workdir`, then `overrides`, on `devices` CPU devices if given;
  the finished process, which must have exited 0."""
  proc = run_main(f"--config=configs/{config}", f"--workdir={workdir}",
                  f"--config.data.data_dir={data_dir}", *TINY_OVERRIDES, *overrides,
                  timeout=timeout, devices=devices)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def assert_written(folder, names):
  """Each of the files `names` in `folder` exists and is not empty."""
  for name in names:
    assert os.path.getsize(os.path.join(folder, name)) > 0, name


def finished_run(name, config, *overrides):
  """A module-scoped fixture named `name`: (workdir, process) of `run_tiny(config, workdir,
  data_dir, *overrides)` on conftest's tiny glyphs. The tests of one file run in one process,
  in order (setup.cfg), so that they may run stages in that workdir one after another."""

  @pytest.fixture(scope="module", name=name)
  def fixture(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp(name))
    return workdir, run_tiny(config, workdir, data_dir, *overrides)

  return fixture


def episode_scores(config, workdir):
  """The eval stage's test features and per-query scores of a finished 1-shot workdir, computed
  in this process (`method.MetaDiff.scores`).

  Returns:
    {"features": [n, D] the test features the stage saw, and per row ("metadiff",
    "untrained", "prototypes"): {"scores": [E, Q, N], "weights": [E, N, D]}}.
  """
  from metadiff_jax import embedding, evaluator, mesh, rng  # pylint: disable=g-import-not-at-top
  from metadiff_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from metadiff_jax.data import episodes  # pylint: disable=g-import-not-at-top
  test = embedding.diffusion_features(
      config, workdir_lib.pretrained_features(config, str(workdir), "test", progress=False))
  e = config.eval
  sampler = episodes.EpisodeSampler(test.labels, e.ways, 1, e.queries, config.seed, "test")
  metadiff, state, init_state, _ = workdir_lib.load_denoiser(config, str(workdir), 1,
                                                             test.features.shape[1])
  features_dev = mesh.replicate(test.features)
  key = rng.key(config, "sampling", 2)
  out = {"features": test.features}
  for row, params in (("metadiff", state.ema_params), ("untrained", init_state.params)):
    scores = evaluator.evaluate_episodes(
        lambda ep, params=params: metadiff.scores({"params": params}, features_dev, ep, key,
                                                  e.ways),
        sampler, e.episodes, e.batch_episodes)
    out[row] = {"scores": scores["scores"], "weights": scores["weights"]}
  # The class means do not depend on the denoiser: those of the last row serve.
  out["prototypes"] = {"scores": scores["prototype_scores"], "weights": scores["prototypes"]}
  return out
