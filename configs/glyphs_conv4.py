"""The embedded default: Conv4 on the glyph dataset, all four stages, 1-shot and 5-shot.

    python -m metadiff_jax.data build glyphs
    python -m metadiff_jax.main --config configs/glyphs_conv4.py --workdir runs/glyphs_conv4

Sized for the README's demo (under 10 minutes on a 2-core CPU, install included). It runs
the recommended variant, `weights_normalized_shot_mean` (docs/STABILITY.md); `:variant=faithful`
runs the paper's method as published. Measured on a 2-core Xeon VM, CPU only: the four
stages took 3 min 50 s alone with the faithful variant (pretrain 102 s, prototypes 4 s, train
90 s, eval 33 s), and 6 min 13 s with the recommended one while a test run shared the two
cores (7 min 16 s from a fresh clone, install and dataset build included). It printed, on
600 test episodes (mean +- 95% CI):

    method                          5-way 1-shot     5-way 5-shot
    MetaDiff (trained TCUNet, EMA)  98.48 +- 0.24%   99.82 +- 0.06%
    same sampler, untrained TCUNet  98.30 +- 0.26%   99.81 +- 0.06%
    class-mean prototypes           98.29 +- 0.26%   99.81 +- 0.06%

1-shot validation was best at the last of the 5,000 steps, 5-shot from step 500 on (level
with class means); the norm ratio stayed between 0.88 and 1.03 throughout. With
`:variant=faithful` MetaDiff gave 97.54 +- 0.34% / 99.82 +- 0.06%, best at step 500 in both
settings, its sampler diverging later (docs/RESULTS.md).

On a 2-core AMD EPYC VM the same command, with the table's row for the last checkpoint,
printed MetaDiff 98.39 +- 0.26% / 99.77 +- 0.07%, class means 98.21 +- 0.27% / 99.77 +- 0.07%,
and the last checkpoint (step 5000 in both settings) 98.39% / 99.77% with norm ratio 0.876 /
0.993; XLA's CPU code differs between processor models, hence the last digits.

Presets: `:shot=1` or `:shot=5` trains and evaluates one shot setting only; `:variant=NAME`
runs another variant (`config_lib.VARIANTS`).
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config("glyphs", "conv4")
  # 410 base classes x 20 images of 32 x 32 x 1: Conv4 gives 2 x 2 x 64 = 256-d features.
  config_lib.cpu_schedule(config, pretrain_epochs=5, train_steps=5000)
  return config_lib.finalize(config, arg)
