"""miniImageNet, Conv4 (64 channels; 84 x 84 inputs give 1,600-d features).

    python -m metadiff_jax.data build mini_imagenet --manual_dir DIR_WITH_ITS_FILES
    python -m metadiff_jax.main --config configs/miniimagenet_conv4.py --workdir runs/mini_conv4

Pretraining and diffusion training as in miniimagenet_resnet12.py.

Not run here: this project's machines cannot obtain miniImageNet. Target (Zhang et al. 2024,
Table 1, MetaDiff with Conv4): 55.06 +- 0.81% (5-way 1-shot), 73.18 +- 0.64% (5-shot).
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config("mini_imagenet", "conv4")
  return config_lib.finalize(config, arg)
