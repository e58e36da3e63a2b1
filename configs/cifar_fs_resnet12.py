"""CIFAR-FS, ResNet12 (32 x 32 inputs).

    python -m metadiff_jax.data build cifar_fs      # downloads CIFAR-100, or --manual_dir
    python -m metadiff_jax.main --config configs/cifar_fs_resnet12.py --workdir runs/cifar_fs_r12

Pretraining as on miniImageNet (100 epochs, x0.1 at 90); diffusion training 100,000 steps
(fewer than the paper's miniImageNet setting: 64 base classes of 32 x 32 images).

Not run here: no accelerator has been lent to this project's sessions so far. The paper
reports no CIFAR-FS result; this config is for comparison with the literature's tables.
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config("cifar_fs", "resnet12")
  config.train.steps = 100_000
  return config_lib.finalize(config, arg)
