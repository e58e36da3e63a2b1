"""Stage 3: diffusion training of the TCUNet on base-class episodes (Algorithm 1, Eq. 12).

One denoiser per shot setting in config.train.shots, each in WORKDIR/train_<K>shot, trained on
the base split's cached features with the prototypes stage's targets
(`diffusion_training.train_shot`: the episodes, the optimiser, the resumable loop).
"""

from __future__ import annotations

from metadiff_jax import diffusion_training, embedding
from metadiff_jax import workdir as workdir_lib


def stage(config, workdir: str) -> None:
  """Trains one denoiser per shot setting in config.train.shots."""
  base, val = (embedding.diffusion_features(config, s) for s in
               workdir_lib.pretrained_splits(config, workdir, ("train", "val")))
  targets = workdir_lib.diffusion_targets(config, workdir, base)
  for shots in config.train.shots:
    diffusion_training.train_shot(config, workdir, int(shots), base, targets, val)
