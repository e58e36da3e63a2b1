"""The MetaDiff core at the paper's sizes: a 1000-step linear schedule and a TCUNet for D = 512.

This config holds the sections that the data stack, the denoiser and the diffusion read; the
pipeline's configs build on it. Use it from Python:

    from metadiff_jax import schedule, tcunet
    config = get_config()
    sched = schedule.from_config(config)
    model = tcunet.TCUNet(**config.denoiser)

Override a field with `config.diffusion.num_steps = 100` (the config is locked, so a misspelt
field raises).
"""

import ml_collections
from ml_collections import config_dict

from metadiff_jax.data import augment


def get_config(arg=None):
  """Returns the locked core config; `arg` is reserved for presets."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The dataset (docs/DATASETS.md): built with `python -m metadiff_jax.data build <name>`.
  config.data = ml_collections.ConfigDict()
  config.data.name = "glyphs"
  config.data.data_dir = "~/tensorflow_datasets"
  config.data.builder_config = config_dict.placeholder(str)  # None: the build named "default"
  # Pretraining augmentations (metadiff_jax.data.augment.DEFAULTS[name]); mean/std None take
  # the dataset's normalisation constants.
  config.data.augment = ml_collections.ConfigDict(augment.DEFAULTS["glyphs"])
  config.data.augment.mean = config_dict.placeholder(tuple)
  config.data.augment.std = config_dict.placeholder(tuple)
  # Hold the pretraining split on the accelerator as uint8 when it takes at most this
  # fraction of its memory; otherwise batches come from the host.
  config.data.device_memory_fraction = 0.5

  # Section 4.2: DDPM's linear schedule, beta from 1e-4 to 0.02 over T = 1000 steps.
  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "linear"  # or "cosine"
  config.diffusion.num_steps = 1000
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02

  # Section 4.3: the TCUNet; hidden_dims None means (D / 2, D / 4).
  config.denoiser = ml_collections.ConfigDict()
  config.denoiser.feature_dim = 512
  config.denoiser.hidden_dims = config_dict.placeholder(tuple)
  config.denoiser.time_embed_dim = 320
  config.denoiser.loss_reduction = "sum"  # the original code; "mean" is Eq. 11 as printed

  config.lock()
  return config
