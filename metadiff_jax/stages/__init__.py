"""The pipeline's stages, each an importable `stage(config, workdir)`, and `run` for all of them.

1. `pretrain`: the embedding network on all base classes (or an imported PyTorch backbone).
2. `prototypes`: the feature cache of every split and the diffusion targets w0.
3. `train`: diffusion training of one TCUNet per shot setting.
4. `eval`: MetaDiff, the untrained denoiser and class-mean prototypes on the test episodes.
5. `analysis` (only where config.stages names it): the paper's Tables 2-4 and Figures 4-5,
   MetaDiff against meta-optimizer baselines and its own ablations (configs/paper_analysis.py).
6. `stability` (only where config.stages names it): whether the faithful reverse process
   diverges, with diagnostics, beside the stabilised variants (configs/stability.py,
   docs/STABILITY.md).

Each stage restores its own checkpoint from the workdir if there is one and skips work already
done, so `run` can be called again after an interruption, or with more steps. A config that
would mix with the outputs already there is refused before anything runs (docs/WORKDIR.md).
"""

from __future__ import annotations

import logging
import os
import time

from metadiff_jax import checks, config_lib, mesh
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import augment
from metadiff_jax.stages import analysis, evaluate, pretrain, prototypes, stability, train

STAGES = {"pretrain": pretrain.stage, "prototypes": prototypes.stage, "train": train.stage,
          "eval": evaluate.stage, "analysis": analysis.stage, "stability": stability.stage}


def run(config, workdir: str) -> None:
  """Runs config.stages in order in `workdir` (created if needed).

  Before the first stage (`metadiff_jax.workdir.guard`): takes the workdir's lock (a second
  run on it stops at once), refuses a config that differs from the workdir's config.json in
  a field that affects outputs already there, and checks every episode setting against the
  dataset. Only then is config.json written. docs/WORKDIR.md says what is allowed.
  """
  checks.check(config)
  config = augment.with_build_statistics(config)
  root = workdir_lib.prepare_workdir(workdir)
  with workdir_lib.guard(config, root):
    logging.info("devices: %s", mesh.describe())
    logging.info("config:\n%s", config)
    if mesh.is_writer():
      workdir_lib.write_json(os.path.join(root, config_lib.WORKDIR_CONFIG), config.to_dict())
    for name in config_lib.stages_of(config):
      start = time.time()
      logging.info("stage %s: starting", name)
      STAGES[name](config, root)
      logging.info("stage %s: finished in %.1f s", name, time.time() - start)
