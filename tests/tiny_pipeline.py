"""The tiny pipeline the pipeline and scaling tests run: its config, overrides and CLI."""

import importlib.util
import os
import subprocess
import sys

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


def tiny_config(data_dir, **sections):
  """glyphs_conv4 shrunk to seconds; `sections` maps 'train.steps' style names to values."""
  config = load_config("glyphs_conv4")
  config.data.data_dir = data_dir
  config.data.builder_config = "tiny"
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
