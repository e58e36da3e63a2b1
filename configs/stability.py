"""The stability study (docs/STABILITY.md): does the faithful reverse process diverge, and which
variant holds up? One command per dataset:

    python -m metadiff_jax.data build glyphs
    python -m metadiff_jax.main --config configs/stability.py:dataset=glyphs --workdir DIR

It runs the dataset's own pipeline config (configs/glyphs_conv4.py here) for the pretrain and
prototypes stages (each skips what its workdir already holds, so pointing --workdir at that
pipeline's workdir reuses its backbone and feature cache), then the stability stage
(metadiff_jax/stages/stability.py), which trains one denoiser per variant, shot setting and
learning rate and writes WORKDIR/stability/stability.md, <K>shot.png and stability.json.

Presets (comma-separated after the colon):
    dataset=glyphs|textures|miniimagenet|tieredimagenet|cifar_fs|fc100   (default glyphs)
    backbone=conv4|resnet12    (default: conv4 for glyphs and textures, resnet12 otherwise)
    shot=1|5|1+5               (as the dataset configs)
"""

import os

from metadiff_jax import config_lib

# dataset preset -> (its config file's dataset part, default backbone)
DATASETS = {"glyphs": ("glyphs", "conv4"), "textures": ("textures", "conv4"),
            "miniimagenet": ("miniimagenet", "resnet12"),
            "tieredimagenet": ("tieredimagenet", "resnet12"),
            "cifar_fs": ("cifar_fs", "resnet12"), "fc100": ("fc100", "resnet12")}


def get_config(arg=None):
  config, dataset, _ = config_lib.dataset_pipeline_config(
      arg, DATASETS, os.path.dirname(os.path.abspath(__file__)))
  config.stages = ("pretrain", "prototypes", "stability")
  if dataset in ("glyphs", "textures"):
    # Sized for a 2-core CPU (docs/STABILITY.md has the time it took): 3,000 steps a
    # denoiser, validated every 250, with 600 test episodes a row.
    config.stability.steps = 3000
    config.stability.val_every_steps = 250
    config.stability.checkpoint_every_steps = 250
    config.stability.val_episodes = 200
    # The recommended variant also trained ten times as long as the pipeline configs train it
    # (5,000 steps), validated and checkpointed every 2,500.
    config.stability.lengths = (50_000,)
  return config
