"""The features of a split under a backbone: the dataset, the backbone, the feature cache.

The stages see images only through here: `load_split` reads a split once per process,
`backbone` builds the configured network, `embed_fn` embeds uint8 images with the dataset's
normalisation, and `split_features` caches the features of a split under given backbone
variables in WORKDIR/features (`metadiff_jax.workdir.pretrained_features` reads them under
the pretrained backbone). `diffusion_features` is what the diffusion stages see of them.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import backbones, mesh, pytorch_weights
from metadiff_jax.data import augment, features
from metadiff_jax.errors import UserError


# ----------------------------------------------------------------------------- the dataset

def dataset_ref(config):
  from metadiff_jax.data import load  # imports tensorflow-datasets: only where data is read
  return load.DatasetRef(config.data.name, config.data.data_dir, config.data.builder_config)


@functools.lru_cache(maxsize=8)
def _load_split(ref, split: str):
  from metadiff_jax.data import load  # imports tensorflow-datasets: only where data is read
  return load.load_split(ref, split)


def load_split(config, split: str):
  """The whole split in memory (`load.SplitArrays`), read once per process."""
  return _load_split(dataset_ref(config), split)


def num_classes(config, split: str) -> int:
  from metadiff_jax.data import load  # imports tensorflow-datasets: only where data is read
  return len(load.class_names(dataset_ref(config), split))


def augment_config(config) -> augment.AugmentConfig:
  return augment.from_config(config.data)


# ----------------------------------------------------------------------------- the backbone

def backbone(config):
  """The configured backbone module."""
  kwargs = {"dtype": jnp.bfloat16 if config.backbone.compute_dtype == "bfloat16" else None}
  if config.backbone.name.startswith("resnet12"):
    kwargs["activate_last"] = config.backbone.activate_last
    if config.backbone.dropblock_rate is not None:
      kwargs["dropblock_rate"] = config.backbone.dropblock_rate
  try:
    return backbones.make(config.backbone.name, **kwargs)
  except ValueError as e:
    raise UserError(f"config.backbone.name: {e}") from None


@functools.lru_cache(maxsize=16)
def embed_fn(module, aug: augment.AugmentConfig):
  """uint8 images -> features of the backbone in eval mode, with the dataset's normalisation.

  Jitted, and one function per (backbone, preprocessing), so that embedding the validation
  split after every pretraining epoch compiles once.
  """

  @jax.jit
  def apply(variables, images):
    features = module.apply(variables, augment.preprocess(images, aug), train=False)
    return features.astype(jnp.float32)

  return apply


def preprocessing_tag(config) -> str:
  """What the embedding does besides the variables (it keys the feature cache)."""
  aug = augment_config(config)
  tag = f"{config.backbone.name}|mean={aug.mean}|std={aug.std}"
  if config.backbone.compute_dtype != "float32":
    tag += f"|{config.backbone.compute_dtype}"
  return tag


def import_backbone(config, template_variables):
  """The backbone variables of config.backbone.checkpoint, checked against the template."""
  path = os.path.expanduser(config.backbone.checkpoint)
  if not os.path.exists(path):
    raise UserError(f"config.backbone.checkpoint {path} does not exist; give the path of a "
                    "PyTorch ResNet12 state dict (.pth or .npz)")
  try:
    return pytorch_weights.load_backbone_file(path, template_variables)
  except (KeyError, ValueError) as e:
    msg = e.args[0] if e.args else str(e)
    raise UserError(f"cannot import the backbone {path}: {msg}") from None


# ----------------------------------------------------------------------------- the features

def split_features(config, workdir: str, split: str, module, variables,
                   progress: bool = True) -> features.FeatureSet:
  """The features of `split` under the backbone (`module`, `variables`), cached in
  WORKDIR/features."""
  data = load_split(config, split)
  return features.split_features(
      workdir, data, split, embed_fn(module, augment_config(config)), variables,
      preprocessing=preprocessing_tag(config), batch_size=config.pretrain.embed_batch_size,
      progress=progress, write=mesh.is_writer())


def diffusion_features(config, feature_set: features.FeatureSet) -> features.FeatureSet:
  """The features the diffusion stages see: the cached ones, or, where
  config.diffusion.feature_rms = r is set, each row rescaled to norm r sqrt(D) (its
  root-mean-square coordinate r). The key says which, so nothing cached mixes them up."""
  rms = config.diffusion.feature_rms
  if rms is None:
    return feature_set
  return dataclasses.replace(feature_set, features=rescale_features(feature_set.features, rms),
                             key=f"{feature_set.key}/rms{float(rms):g}")


def rescale_features(x, rms) -> np.ndarray:
  """[n, D] features with each row rescaled to norm rms sqrt(D) (float32); rms None: as is."""
  if rms is None:
    return np.asarray(x, np.float32)
  x = np.asarray(x, np.float64)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return (x * (float(rms) * np.sqrt(x.shape[1]) / np.maximum(norms, 1e-12))).astype(np.float32)
