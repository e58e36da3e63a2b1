"""miniImageNet, ResNet12 (64-128-256-512): the paper's Table 1 setting.

    python -m metadiff_jax.data build mini_imagenet --manual_dir DIR_WITH_ITS_FILES
    python -m metadiff_jax.main --config configs/miniimagenet_resnet12.py --workdir runs/mini_r12
    python -m metadiff_jax.main --config configs/miniimagenet_resnet12.py:shot=1 --workdir ...

Pretraining: Classifier-Baseline's miniImageNet recipe (SGD 0.1, momentum 0.9, weight decay
5e-4, batch 128, 100 epochs, x0.1 at epoch 90). Diffusion training: 30 epochs x 10,000
iterations of 8 episodes (Section 5.2), Adam 1e-4, T = 1000.

Not run here: this project's machines cannot obtain miniImageNet. Target (Zhang et al. 2024,
Table 1, MetaDiff with ResNet12): 64.99 +- 0.77% (5-way 1-shot), 81.21 +- 0.56% (5-shot).
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config("mini_imagenet", "resnet12")
  return config_lib.finalize(config, arg)
