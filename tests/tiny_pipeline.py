"""The tiny pipeline the pipeline and scaling tests run: its config, overrides and CLI, and
the per-query scores of a finished run."""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


TINY_OVERRIDES = [
    "--config.data.builder_config=tiny", "--config.pretrain.epochs=2",
    "--config.pretrain.batch_size=32", "--config.pretrain.val_episodes=20",
    "--config.pretrain.log_every_steps=5", "--config.diffusion.num_steps=10",
    "--config.denoiser.hidden_dims=(32, 16)", "--config.train.shots=(1,)",
    "--config.train.steps=20", "--config.train.steps_per_call=5",
    "--config.train.val_every_steps=10", "--config.train.val_episodes=10",
    "--config.train.log_every_steps=5", "--config.train.checkpoint_every_steps=5",
    "--config.train.ema_start_step=5", "--config.eval.episodes=20",
    "--config.eval.batch_episodes=8",
]


def tiny_config(data_dir, config_name="glyphs_conv4", builder_config="tiny", **sections):
  """A config file's config (glyphs_conv4 by default) shrunk to seconds, on the build
  `builder_config` in `data_dir`; `sections` maps 'train__steps' style names to values."""
  config = load_config(config_name)
  config.data.data_dir = data_dir
  config.data.builder_config = builder_config
  config.pretrain.update(dict(epochs=2, batch_size=32, val_episodes=20, log_every_steps=5))
  config.diffusion.num_steps = 10
  config.denoiser.hidden_dims = (32, 16)
  config.train.update(dict(shots=(1,), steps=20, steps_per_call=5, val_every_steps=10,
                           val_episodes=10, log_every_steps=5, checkpoint_every_steps=5,
                           ema_start_step=5))
  config.eval.update(dict(episodes=20, batch_episodes=8))
  for name, value in sections.items():
    section, field = name.split("__")
    config[section][field] = value
  return config


def config_from_args(name, arg, data_dir, overrides):
  """The config `python -m metadiff_jax.main --config=configs/NAME.py:ARG OVERRIDES` runs,
  built in this process; `overrides` are "--config.section.field=value" strings."""
  import ast  # pylint: disable=g-import-not-at-top
  config = load_config(name, arg)
  config.data.data_dir = data_dir
  for override in overrides:
    path, text = override[len("--config."):].split("=", 1)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *sections, field = path.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def main_command(*args):
  return [sys.executable, "-m", "metadiff_jax.main", *args]


def cpu_env(devices=None, **extra):
  """The environment of a CPU-only run, with `devices` simulated devices if given."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def run_main(*args, timeout=600, devices=None):
  """`python -m metadiff_jax.main ARGS` on the CPU; the finished process."""
  return subprocess.run(main_command(*args), cwd=REPO, env=cpu_env(devices),
                        capture_output=True, text=True, timeout=timeout)


def episode_scores(config, workdir):
  """The eval stage's test features and per-query scores of a finished 1-shot workdir, computed
  in this process (`evaluate.episode_scores`).

  Returns:
    {"features": [n, D] the test features the stage saw, and per row ("metadiff",
    "untrained", "prototypes"): {"scores": [E, Q, N], "weights": [E, N, D]}}.
  """
  from metadiff_jax import schedule  # pylint: disable=g-import-not-at-top
  from metadiff_jax.data import episodes  # pylint: disable=g-import-not-at-top
  from metadiff_jax.stages import common, evaluate  # pylint: disable=g-import-not-at-top
  test = common.diffusion_features(
      config, common.split_features(config, str(workdir), "test", progress=False))
  e = config.eval
  sampler = episodes.EpisodeSampler(test.labels, e.ways, 1, e.queries, config.seed, "test")
  model, state, init_state, _ = evaluate.load_denoiser(config, str(workdir), 1,
                                                       test.features.shape[1])
  features_dev = jax.numpy.asarray(test.features)
  key = common.key(config, "sampling", 2)
  options = evaluate.sampler_options(config)
  out = {"features": test.features}
  sched = schedule.for_sampling(config)
  for row, params in (("metadiff", state.ema_params), ("untrained", init_state.params)):
    parts = []
    for start in range(0, e.episodes, e.batch_episodes):
      ep = sampler.batch(start, e.batch_episodes)
      parts.append(jax.device_get(evaluate.episode_scores(
          model, {"params": params}, sched, features_dev, ep.support, ep.support_labels,
          ep.query, ep.index.astype(np.int32), key, e.ways, **options)))
    scores = {k: np.concatenate([p[k] for p in parts])[:e.episodes] for k in parts[0]}
    out[row] = {"scores": scores["scores"], "weights": scores["weights"]}
  # The class means do not depend on the denoiser: those of the last batch loop serve.
  out["prototypes"] = {"scores": scores["prototype_scores"], "weights": scores["prototypes"]}
  return out
