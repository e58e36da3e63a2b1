"""The second embedded set: Conv4 on the procedural textures, all four stages, 1-shot and 5-shot.

    python -m metadiff_jax.data build textures
    python -m metadiff_jax.main --config configs/textures_conv4.py --workdir runs/textures_conv4

The same sizes as configs/glyphs_conv4.py, on a set that leaves headroom above class means
(docs/TEXTURES.md). Measured on a 2-core Xeon VM, CPU only, shared with other jobs at the time
(load average ~6): 6 min 3 s for the four stages (pretrain 182 s, prototypes 8 s, train 121 s,
eval 51 s). Pretraining's validation check (1-shot class means) rose 0.38, 0.47, 0.52, 0.62,
0.66 over the five epochs. With the faithful variant (`:variant=faithful`, then the
default) it printed, on 600 test episodes (mean +- 95% CI):

    method                          5-way 1-shot     5-way 5-shot
    MetaDiff (trained TCUNet, EMA)  46.17 +- 0.91%   81.03 +- 0.72%
    same sampler, untrained TCUNet  65.90 +- 0.92%   81.08 +- 0.72%
    class-mean prototypes           65.93 +- 0.92%   81.06 +- 0.72%

MetaDiff's validation was best after 500 of the 5,000 steps in both settings (1-shot 0.454
against class means' 0.663; 5-shot level with them); later the sampler diverged (norm ratios
far above 1), as on the glyphs. At 1-shot the kept step-500 EMA denoiser is 20 points below
class means. docs/STABILITY.md compares every variant on this dataset, the recommended
default among them.

Presets: `:shot=1` or `:shot=5` trains and evaluates one shot setting only; `:variant=NAME`
runs another variant (`config_lib.VARIANTS`); `:tiny=1` shrinks every stage to seconds on the
build named "tiny" (`config_lib.TINY`).
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  # 384 base classes x 20 images of 32 x 32 x 3: Conv4 gives 2 x 2 x 64 = 256-d features.
  return config_lib.cpu_conv4("textures", arg, pretrain_epochs=5, train_steps=5000)
