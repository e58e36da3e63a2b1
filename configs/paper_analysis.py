"""The paper's analyses (Tables 2-4, Figures 4-5) on one dataset, from one command.

    python -m metadiff_jax.data build glyphs
    python -m metadiff_jax.main --config configs/paper_analysis.py:dataset=glyphs \
        --workdir runs/glyphs_conv4

It runs the dataset's own pipeline config (configs/glyphs_conv4.py here) up to the train stage
(each stage skips what its workdir already holds, so pointing --workdir at that pipeline's
workdir reuses its backbone, feature cache and denoisers), then the analysis stage
(metadiff_jax/stages/analysis.py), which writes WORKDIR/analysis/table2.md, table3.md,
table4.md, fig4_memory.png, fig5_convergence.png and their JSON. docs/REPRODUCTION.md shows
what it found on the glyph dataset and the commands for miniImageNet and tieredImageNet.

It analyses the variant that pipeline config runs (the recommended one, `linear_prior`,
sampled in 10 respaced steps, so its Figure 5 curve has the points of those 10 steps), so that the command above works right after the README's
demo in the same workdir: only the stage list and `config.analysis` differ from the demo's
config, and they concern the analysis stage alone. `variant=NAME` analyses another variant;
its denoisers differ from the demo's, so give it a workdir of its own (or one where the
pipeline ran with the same `:variant=NAME`).

Presets (comma-separated after the colon):
    dataset=glyphs|miniimagenet|tieredimagenet|cifar_fs|fc100   (default glyphs)
    backbone=conv4|resnet12    (default: conv4 for glyphs, resnet12 otherwise)
    shot=1|5|1+5               (as the dataset configs)
    variant=NAME               (default: the pipeline config's; config_lib.VARIANTS)

The paper's method as published, as docs/REPRODUCTION.md reports it:

    python -m metadiff_jax.main --config configs/paper_analysis.py:dataset=glyphs,variant=faithful \
        --workdir runs/glyphs_faithful

Measured so on a 2-core Xeon VM, CPU only, glyph dataset, from an empty workdir: 17 min 43 s
(pipeline 3 min 50 s, analysis 14 min 19 s). It printed Table 2 as (600 test episodes,
mean +- 95% CI; docs/REPRODUCTION.md has all of it and what it means):

    method                  5-way 1-shot     5-way 5-shot
    class-mean prototypes   98.29 +- 0.26%   99.81 +- 0.06%
    GDA, momentum GDA       98.30 +- 0.26%   99.81 +- 0.06%
    ANIL, MetaLSTM          98.30 +- 0.26%   99.81 +- 0.06%
    ALFA                    98.29 +- 0.26%   99.81 +- 0.06%
    MetaDiff                97.54 +- 0.34%   99.82 +- 0.06%
"""

import os

from metadiff_jax import config_lib

# dataset preset -> (its config file's dataset part, default backbone)
DATASETS = {"glyphs": ("glyphs", "conv4"), "miniimagenet": ("miniimagenet", "resnet12"),
            "tieredimagenet": ("tieredimagenet", "resnet12"),
            "cifar_fs": ("cifar_fs", "resnet12"), "fc100": ("fc100", "resnet12")}


def get_config(arg=None):
  # The pipeline config's own variant unless `variant=NAME` is given: the analysis then reuses
  # (and must fit) the backbone, features and denoisers of that config's workdir.
  config, dataset, own = config_lib.dataset_pipeline_config(
      arg, DATASETS, os.path.dirname(os.path.abspath(__file__)), own={"variant": None})
  config.stages = ("pretrain", "prototypes", "train", "analysis")
  if own["variant"] is not None:
    config_lib.apply_variant(config, own["variant"])
  a = config.analysis
  if dataset == "glyphs":
    # Sized for a 2-core CPU (docs/REPRODUCTION.md has the time it took). The ablation
    # denoisers train for 2,000 steps: the TCUNet's validation peaks by step 500 here.
    a.meta_steps = 1500
    a.val_every_steps = 250
    a.val_episodes = 200
    a.log_every_steps = 50
    a.denoiser_steps = 2000
  return config
