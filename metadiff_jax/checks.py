"""Every check of a config before a run: `check(config)`.

`config_lib` holds the defaults and the checks that need no model module (known stages, finite
numbers, positive sizes, allowed names); each other value is checked by the module that owns
it (`heads`, `tcunet`, `diffusion`, `schedule`), so that the config sits below the model and a
value's rule lives beside the code that reads it. Last, the batches the run splits over the
devices must split evenly, which only the run's devices can tell.

Every check raises a one-line `ConfigError` naming the field and what to do.
"""

from __future__ import annotations

from metadiff_jax import config_lib, diffusion, heads, mesh, schedule, tcunet
from metadiff_jax.errors import ConfigError


def check(config) -> None:
  """Checks what a locked config cannot: run before any stage, overrides included.

  Raises:
    ConfigError: the first value that cannot work.
  """
  config_lib.check(config)
  schedule.check_config(config.diffusion)
  heads.check_config(config.denoiser)
  tcunet.check_config(config.denoiser)
  diffusion.check_config(config.diffusion)
  check_device_split(config)


def check_device_split(config) -> None:
  """Raises a ConfigError where a batch that a stage to run splits over this run's devices
  does not split evenly."""
  shards = mesh.num_shards()
  stages = config_lib.stages_of(config)
  for stage, field in (("pretrain", "pretrain.batch_size"),
                       ("train", "train.episodes_per_step"),
                       ("analysis", "train.episodes_per_step"),
                       ("stability", "train.episodes_per_step"),
                       ("analysis", "analysis.meta_episodes_per_step")):
    section, name = field.split(".")
    value = config[section][name]
    imported = stage == "pretrain" and config.backbone.checkpoint
    if stage in stages and not imported and value % shards:
      raise ConfigError(f"config.{field} = {value} does not split over the {shards} devices "
                        f"of this run; make it a multiple of {shards}")
