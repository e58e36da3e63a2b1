"""tieredImageNet, ResNet12 (64-128-256-512): the paper's Table 1 setting.

    python -m metadiff_jax.data build tiered_imagenet --manual_dir DIR_WITH_ITS_FILES
    python -m metadiff_jax.main --config configs/tieredimagenet_resnet12.py --workdir runs/tiered_r12

351 base classes, about 448k images: pretraining runs fewer epochs than on miniImageNet
(the miniImageNet optimiser for 20 epochs, x0.1 at epoch 15; adjust with --config.pretrain.*).
Diffusion training: 30 epochs x 10,000 iterations (Section 5.2).

Not run here: this project's machines cannot obtain tieredImageNet. Target (Zhang et al. 2024,
Table 1, MetaDiff with ResNet12): 72.33 +- 0.92% (5-way 1-shot), 86.31 +- 0.62% (5-shot).
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config("tiered_imagenet", "resnet12")
  config.pretrain.epochs = 20
  config.pretrain.lr_decay_epochs = (15,)
  return config_lib.finalize(config, arg)
