"""The embedded default: Conv4 on the glyph dataset, all four stages, 1-shot and 5-shot.

    python -m metadiff_jax.data build glyphs
    python -m metadiff_jax.main --config configs/glyphs_conv4.py --workdir runs/glyphs_conv4

Sized for the README's demo: 3 min 19 s from a fresh clone on a 2-core Xeon VM, CPU only,
install and dataset build included (pretrain 110 s, prototypes 4 s, train 38 s, eval 12 s).
It runs the recommended variant, `linear_prior` (x0-prediction as a correction to a learned
linear map of the support means, sampled in 10 respaced steps; docs/STABILITY.md);
`:variant=faithful` runs the paper's method as published. That run printed, on 600 test
episodes (mean +- 95% CI):

    method                          5-way 1-shot     5-way 5-shot
    MetaDiff (trained TCUNet, EMA)  98.75 +- 0.22%   99.84 +- 0.06%
    same sampler, untrained TCUNet  98.35 +- 0.25%   99.82 +- 0.06%
    class-mean prototypes           98.29 +- 0.26%   99.81 +- 0.06%
    MetaDiff, last checkpoint       98.75 +- 0.22%   99.84 +- 0.06%

1-shot validation was best at the last of the 5,000 steps, 5-shot at step 500; the norm ratio
was 0.91 (1-shot) and 0.98-0.99 (5-shot). The stability study (docs/STABILITY.md) trained the
same variant for 3,000 and 50,000 steps: last checkpoints 98.70 / 98.78% at 1-shot and 99.84%
at 5-shot, and the closed-form linear shrinkage of the support means, with no denoiser,
98.83 / 99.85%. XLA's CPU code differs between processor models, so other machines' last
digits can differ. With `:variant=faithful` MetaDiff gave 97.54 +- 0.34% / 99.82 +- 0.06% on
the Xeon VM, best at step 500 in both settings, its sampler diverging later (docs/RESULTS.md).

Presets: `:shot=1` or `:shot=5` trains and evaluates one shot setting only; `:variant=NAME`
runs another variant (`config_lib.VARIANTS`); `:tiny=1` shrinks every stage to seconds on the
build named "tiny" (`config_lib.TINY`), as the tests run it.
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  # 410 base classes x 20 images of 32 x 32 x 1: Conv4 gives 2 x 2 x 64 = 256-d features.
  return config_lib.cpu_conv4("glyphs", arg, pretrain_epochs=5, train_steps=5000)
