"""Stage 2: the feature cache and the diffusion targets w0 (Algorithm 1, line 3).

The frozen pretrained backbone embeds the base, validation and test splits once (the feature
cache, keyed on the backbone and the dataset). The target of base class c is the mean of its
features over all its base images (Section 4.2: the auxiliary set D_base^tau of an episode holds
every image of its classes, and the prototype classifier fit to it is the class mean).

`config.prototypes.augmented_passes = n > 0` averages instead over n passes of augmented images
(the training augmentation, one independent draw per image and pass), as the original code did
with one pass; clean images are the default, because the targets should be the prototypes of
the images that the test-time classifier will see.

Output: WORKDIR/prototypes/targets.npz with `targets` [C, D] float32, and the fingerprints of
the backbone and the features it came from.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from metadiff_jax import embedding, mesh, metrics, rng
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import augment, features
from metadiff_jax.errors import StageError


def augmented_class_means(config, module, variables, data, passes: int) -> np.ndarray:
  """[C, D] class means over `passes` augmented passes of the split's images."""
  aug = embedding.augment_config(config)
  batch = config.pretrain.embed_batch_size
  base_key = rng.key(config, "prototypes")

  @jax.jit
  def embed_augmented(variables, images, key):
    x = augment.augment_batch(key, images, aug)
    return module.apply(variables, x, train=False)

  n = len(data.images)
  sums, counts = None, np.bincount(data.labels, minlength=data.num_classes) * passes
  with metrics.Progress(passes * -(-n // batch), "augmented targets", unit="batch") as bar:
    for p in range(passes):
      for start in range(0, n, batch):
        images = np.asarray(data.images[start:start + batch])
        valid = len(images)
        if valid < batch:  # pad, so that the embedding compiles once
          images = np.concatenate([images, np.zeros((batch - valid, *images.shape[1:]),
                                                    images.dtype)])
        key = jax.random.fold_in(jax.random.fold_in(base_key, p), start)
        feats = np.asarray(embed_augmented(variables, images, key), np.float64)[:valid]
        if sums is None:
          sums = np.zeros((data.num_classes, feats.shape[1]))
        np.add.at(sums, data.labels[start:start + valid], feats)
        bar.update(1)
  return (sums / counts[:, None]).astype(np.float32)


def stage(config, workdir: str) -> None:
  """Embeds the splits with the frozen backbone and writes the base-class targets."""
  module, variables = workdir_lib.pretrained_backbone(config, workdir)
  base = embedding.split_features(config, workdir, "train", module, variables)
  for split in ("val", "test"):
    embedding.split_features(config, workdir, split, module, variables)
  passes = int(config.prototypes.augmented_passes)
  path = workdir_lib.targets_path(workdir)
  if os.path.exists(path):
    with np.load(path) as f:
      if str(f["feature_key"]) == base.key and int(f["augmented_passes"]) == passes:
        logging.info("prototypes: targets for these features already in %s; skipping", path)
        return
  if passes == 0:
    targets = np.asarray(features.class_means(base.features, base.labels, base.num_classes))
  else:
    targets = augmented_class_means(config, module, variables,
                                    embedding.load_split(config, "train"), passes)
  if not np.all(np.isfinite(targets)):
    raise StageError("the diffusion targets contain NaN or infinite values; check the "
                     "pretrained backbone (rerun the pretrain stage)")
  if mesh.is_writer():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, targets=targets, feature_key=base.key, augmented_passes=passes,
             backbone=features.variables_fingerprint(variables))
    os.replace(tmp, path)
  mesh.barrier("prototypes targets")  # the train stage of every process reads the file
  norms = np.linalg.norm(targets, axis=1)
  logging.info("prototypes: %d base-class targets of dimension %d (norm %.3g +- %.2g) -> %s",
               targets.shape[0], targets.shape[1], norms.mean(), norms.std(), path)

