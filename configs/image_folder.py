"""A template for your own images: ROOT/{train,val,test}/<class name>/<image files>.

    python -m metadiff_jax.data build image_folder --manual_dir ROOT --config mydata --image_size 84
    python -m metadiff_jax.main --config configs/image_folder.py \
        --config.data.builder_config=mydata --workdir runs/mydata

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
