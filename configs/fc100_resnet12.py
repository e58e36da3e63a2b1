"""FC100, ResNet12 (32 x 32 inputs; splits by CIFAR-100 superclass).

    python -m metadiff_jax.data build fc100         # downloads CIFAR-100, or --manual_dir
    python -m metadiff_jax.main --config configs/fc100_resnet12.py --workdir runs/fc100_r12

Pretraining as on miniImageNet (100 epochs, x0.1 at 90); diffusion training 100,000 steps.

Not run here: no accelerator has been lent to this project's sessions so far. The paper
reports no FC100 result; this config is for comparison with the literature's tables.
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config("fc100", "resnet12")
  config.train.steps = 100_000
  return config_lib.finalize(config, arg)
