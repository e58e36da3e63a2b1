"""A template for your own photographs on a GPU: ROOT/{train,val,test}/<class name>/<images>.

    python -m metadiff_jax.data build image_folder --manual_dir ROOT --config mydata --image_size 84
    python -m metadiff_jax.main --config configs/image_folder.py \
        --config.data.builder_config=mydata --workdir runs/mydata

ResNet12, 50 pretraining epochs and photo augmentations (crops, flips, colour jitter): sized
for a GPU. For a CPU, or for characters and drawings, start from configs/image_folder_conv4.py.
Images are normalised with the mean and standard deviation of the build's own train split,
per channel (grayscale builds, `--channels 1`, included); set config.data.augment.mean and
.std to override them (docs/DATASETS.md).

Copy this file and edit it: the backbone (Conv4 for small data, ResNet12 for more), the
pretraining epochs (each epoch is one pass over your train split) and the diffusion steps.
Every class of val and test needs at least shots + queries images (5 + 15 by default; lower
config.eval.queries and config.train.val_queries for small classes). Not run on real user
data here; its pipeline is the glyph demo's.
"""

from metadiff_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config("image_folder", "resnet12")
  config.data.builder_config = "default"
  config.pretrain.epochs = 50
  config.pretrain.lr_decay_epochs = (40,)
  config.train.steps = 50_000
  return config_lib.finalize(config, arg)
