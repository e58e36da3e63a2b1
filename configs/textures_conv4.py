"""The second embedded set: Conv4 on the procedural textures, all four stages, 1-shot and 5-shot.

    python -m metadiff_jax.data build textures
    python -m metadiff_jax.main --config configs/textures_conv4.py --workdir runs/textures_conv4

The same sizes as configs/glyphs_conv4.py, on a set that leaves headroom above class means
(docs/TEXTURES.md). Measured on a 2-core Xeon VM, CPU only: pretrain 182 s and prototypes 8 s
(shared with other jobs at the time, load average ~6); with the recommended variant,
`linear_prior` (docs/STABILITY.md), train 40 s and eval 12 s for both shot settings. Pretraining's
validation check (1-shot class means) rose 0.38, 0.47, 0.52, 0.62, 0.66 over the five epochs.
The default printed, on 600 test episodes (mean +- 95% CI):

    method                          5-way 1-shot     5-way 5-shot
    MetaDiff (trained TCUNet, EMA)  71.56 +- 0.92%   82.49 +- 0.69%
    same sampler, untrained TCUNet  65.93 +- 0.92%   80.94 +- 0.72%
    class-mean prototypes           65.93 +- 0.92%   80.92 +- 0.72%
    MetaDiff, last checkpoint       71.45 +- 0.92%   82.49 +- 0.69%

Validation was best at step 3,000 (1-shot) and 5,000 (5-shot) of the 5,000, norm ratios
0.84-0.95. The stability study trained the same variant 50,000 steps: last checkpoints 71.11%
and 82.50%; the closed-form linear shrinkage of the support means, with no denoiser, 71.65%
and 82.70%. With the faithful variant (`:variant=faithful`) MetaDiff printed 46.17 +- 0.91% and
81.03 +- 0.72%, its validation best after 500 of the 5,000 steps and its sampler diverging
later (norm ratios far above 1), as on the glyphs.

Presets: `:shot=1` or `:shot=5` trains and evaluates one shot setting only; `:variant=NAME`
runs another variant (`config_lib.VARIANTS`); `:tiny=1` shrinks every stage to seconds on the
build named "tiny" (`config_lib.TINY`).
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  # 384 base classes x 20 images of 32 x 32 x 3: Conv4 gives 2 x 2 x 64 = 256-d features.
  return config_lib.cpu_conv4("textures", arg, pretrain_epochs=5, train_steps=5000)
