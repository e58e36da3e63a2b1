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

from metadiff_jax import mesh, metrics
from metadiff_jax.data import augment, features
from metadiff_jax.errors import StageError
from metadiff_jax.stages import common

TARGETS_FILE = "targets.npz"


def targets_path(workdir: str) -> str:
  return os.path.join(common.stage_dir(workdir, "prototypes"), TARGETS_FILE)


def load_targets(workdir: str, feature_set: features.FeatureSet) -> np.ndarray:
  """[C, D] targets written for these base features, or a StageError naming the stage to run."""
  path = targets_path(workdir)
  if not os.path.exists(path):
    raise StageError(f"no diffusion targets in {path}; run the prototypes stage first "
                     "(--config.stages=\"('prototypes', 'train')\")")
  with np.load(path) as f:
    targets, key = f["targets"], str(f["feature_key"])
  if key != feature_set.key:
    raise StageError(f"the targets in {path} were computed from other features ({key}) than "
                     f"the current base features ({feature_set.key}); rerun the prototypes "
                     "stage")
  bad = features.non_finite_rows(targets)
  if bad:  # the stage refuses to write such targets, so the file was damaged since
    raise StageError(f"the diffusion targets in {path} hold NaN or infinite values in {bad} of "
                     f"{len(targets)} classes; delete that file and rerun the prototypes stage")
  return targets


def diffusion_targets(config, workdir: str, base: features.FeatureSet) -> np.ndarray:
  """[C, D] the targets of the base features as the diffusion sees them
  (`common.diffusion_features`): this stage's file, or, for rescaled features, their class
  means (computed here: a pass over the cache)."""
  if config.diffusion.feature_rms is None:
    return load_targets(workdir, base)
  if not os.path.exists(targets_path(workdir)):  # the stage that caches the features
    raise StageError(f"no diffusion targets in {targets_path(workdir)}; run the prototypes "
                     "stage first (--config.stages=\"('prototypes', 'train')\")")
  return np.asarray(features.class_means(base.features, base.labels, base.num_classes))


def augmented_class_means(config, module, variables, data, passes: int) -> np.ndarray:
  """[C, D] class means over `passes` augmented passes of the split's images."""
  aug = common.augment_config(config)
  batch = config.pretrain.embed_batch_size
  base_key = common.key(config, "prototypes")

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
  module, variables = common.pretrained_backbone(config, workdir)
  base = common.split_features(config, workdir, "train", module, variables)
  for split in ("val", "test"):
    common.split_features(config, workdir, split, module, variables)
  passes = int(config.prototypes.augmented_passes)
  path = targets_path(workdir)
  if os.path.exists(path):
    with np.load(path) as f:
      if str(f["feature_key"]) == base.key and int(f["augmented_passes"]) == passes:
        logging.info("prototypes: targets for these features already in %s; skipping", path)
        return
  if passes == 0:
    targets = np.asarray(features.class_means(base.features, base.labels, base.num_classes))
  else:
    targets = augmented_class_means(config, module, variables,
                                    common.load_split(config, "train"), passes)
  if not np.all(np.isfinite(targets)):
    raise StageError("the diffusion targets contain NaN or infinite values; check the "
                     "pretrained backbone (rerun the pretrain stage)")
  if common.is_writer():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, targets=targets, feature_key=base.key, augmented_passes=passes,
             backbone=features.variables_fingerprint(variables))
    os.replace(tmp, path)
  mesh.barrier("prototypes targets")  # the train stage of every process reads the file
  norms = np.linalg.norm(targets, axis=1)
  logging.info("prototypes: %d base-class targets of dimension %d (norm %.3g +- %.2g) -> %s",
               targets.shape[0], targets.shape[1], norms.mean(), norms.std(), path)

