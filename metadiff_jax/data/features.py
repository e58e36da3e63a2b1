"""The feature cache: a split embedded once by a frozen backbone, then sampled as features.

MetaDiff's diffusion stage and its evaluation work on frozen features (the backbone is trained
first and then fixed, Section 4.2), so each split is embedded once (jitted, in fixed-size
batches, with a progress bar) and stored in the workdir as [num_images, D] float32 features
with their labels. The file name carries a fingerprint of the backbone's variables, the
dataset's build and the preprocessing, so a changed backbone or dataset never reuses stale
features, and an unchanged one never recomputes them.

Episodes are then gathered from the features on device with the episode sampler's index
batches (`gather`), and the diffusion targets of Algorithm 1, line 3 (the mean feature of each
base class over all its images) are `class_means`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import mesh, metrics, prototypes
from metadiff_jax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class FeatureSet:
  """A split's features.

  Attributes:
    features: [n, D] float32.
    labels: [n] int32 within-split class labels in [0, C).
    num_classes: C.
    key: the cache key (dataset fingerprint, split, backbone fingerprint, preprocessing).
  """

  features: np.ndarray
  labels: np.ndarray
  num_classes: int
  key: str


def variables_fingerprint(variables) -> str:
  """A short hex of a pytree of arrays: its paths, shapes, dtypes and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    leaf = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{leaf.dtype}{leaf.shape}".encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


def embed(apply_fn: Callable, variables, images: np.ndarray, batch_size: int = 256,
          progress: bool = True, desc: str = "embedding",
          split: str | None = None) -> np.ndarray:
  """Features of all `images` under `apply_fn(variables, batch) -> [b, D]`.

  Each batch is split over the devices of the data mesh (each process puts only the images
  its devices hold), and the features come back whole to every process. Batches are
  dispatched ahead of the host's copy of their features, so the device never waits on the
  host between batches.

  Args:
    apply_fn: the backbone in eval mode, uint8 [b, H, W, C] -> [b, D] (preprocessing inside);
      jitted here unless it already is.
    variables: its variables.
    images: [n, H, W, C] uint8 host array (or any sequence of such images), the same on
      every process.
    batch_size: images per call, rounded up to a multiple of the device count; the last
      batch is padded, so `apply_fn` compiles once.
    progress: show a progress bar with rate and ETA.
    desc: the progress bar's label.
    split: the split's name, for the message of non-finite features.

  Returns:
    [n, D] float32 host array.

  Raises:
    DataError: if any feature is NaN or infinite (a diverged or damaged backbone): nothing
      downstream can use such a row, and averaging it into accuracies would report chance.
  """
  n = len(images)
  if n == 0:
    raise DataError("cannot embed an empty split")
  fn = apply_fn if hasattr(apply_fn, "lower") else jax.jit(apply_fn)
  batch_size = mesh.padded_size(batch_size)
  out = None
  in_flight = []  # (start, valid, device features), at most `depth` batches ahead of the host
  depth = 2

  def rows(start):
    def get(a, b):
      block = np.asarray(images[start + a:start + b])
      if len(block) < b - a:  # the padded tail of the last batch
        block = np.concatenate([block, np.zeros((b - a - len(block), *block.shape[1:]),
                                                block.dtype)])
      return block
    return get

  def collect(start, valid, feats):
    nonlocal out
    feats = np.asarray(mesh.to_host(feats), np.float32)
    if feats.ndim != 2 or feats.shape[0] != batch_size:
      raise ValueError(f"apply_fn must map [b, H, W, C] to [b, D], got {feats.shape}")
    if out is None:
      out = np.empty((n, feats.shape[1]), np.float32)
    out[start:start + valid] = feats[:valid]
    bar.update(valid)

  bar = metrics.Progress(n, desc, unit="img", enabled=progress and mesh.is_writer())
  for start in range(0, n, batch_size):
    batch = mesh.shard_rows(batch_size, rows(start))
    in_flight.append((start, min(batch_size, n - start), fn(variables, batch)))
    if len(in_flight) > depth:
      collect(*in_flight.pop(0))
  for item in in_flight:
    collect(*item)
  bar.close()
  bad = non_finite_rows(out)
  if bad:
    where = f"the {split} split" if split else "the images"
    raise DataError(f"the backbone produced NaN or infinite features for {bad} of {n} images of "
                    f"{where} (nothing was cached); its weights are damaged or diverged: rerun "
                    "the pretrain stage, or check config.backbone.checkpoint")
  return out


def non_finite_rows(features: np.ndarray) -> int:
  """How many rows of [n, D] `features` hold a NaN or an infinity."""
  features = np.asarray(features)
  return int(np.sum(~np.all(np.isfinite(features.reshape(len(features), -1)), axis=1)))


def cache_key(dataset_fingerprint: str, split: str, backbone_fingerprint: str,
              preprocessing: str = "") -> str:
  """The file stem under which a split's features are cached."""
  prep = hashlib.sha256(preprocessing.encode()).hexdigest()[:8]
  return f"{dataset_fingerprint}-{split}-{backbone_fingerprint}-{prep}"


def cached_features(workdir: str, key: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]],
                    num_classes: int, write: bool = True) -> FeatureSet:
  """The features stored under `key` in workdir/features, computed and stored if absent.

  Args:
    workdir: the run's directory.
    key: from `cache_key`.
    compute: () -> (features [n, D], labels [n]); called only on a cache miss.
    num_classes: the split's class count C.
    write: whether this process writes the file (process 0 of several).

  Returns:
    The FeatureSet. A damaged cache file is recomputed (with a warning), never trusted.

  Raises:
    DataError: if the features (cached or computed) hold NaN or infinite values. A readable
      cache file with them is not recomputed silently: either the disk damaged it or the
      backbone produced them, and only the user can tell which, so the message says both.
  """
  path = os.path.join(os.path.expanduser(workdir), "features", key + ".npz")
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        features, labels = f["features"], f["labels"].astype(np.int32)
      if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"shapes {features.shape} {labels.shape}")
      if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes})")
    except Exception as e:  # noqa: BLE001  (a damaged derived file: recompute it)
      logging.warning("feature cache %s is unreadable (%s); recomputing it", path, e)
    else:
      _check_finite_cache(features, path)
      logging.info("feature cache hit: %s", path)
      return FeatureSet(features, labels, num_classes, key)
  features, labels = compute()
  labels = np.asarray(labels, np.int32)
  _check_finite_cache(features, path, computed=True)  # a `compute` other than `embed`
  if write:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, features=features, labels=labels)
    os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache
    logging.info("feature cache written: %s", path)
  # The other processes wait for the file, so that all of them take the same path (hit or
  # miss) the next time this split is asked for: a miss is a collective computation.
  mesh.barrier(f"features {key}")
  return FeatureSet(features, labels, num_classes, key)


def _check_finite_cache(features: np.ndarray, path: str, computed: bool = False) -> None:
  bad = non_finite_rows(features)
  if not bad:
    return
  if computed:
    raise DataError(f"the features computed for {path} hold NaN or infinite values in {bad} of "
                    f"{len(features)} rows (nothing was cached); the backbone produces them: "
                    "rerun the pretrain stage, or check config.backbone.checkpoint")
  raise DataError(f"the feature cache {path} holds NaN or infinite values in {bad} of "
                  f"{len(features)} rows; delete that file so that it is recomputed (if the new "
                  "one fails the same way, the backbone produces them: rerun the pretrain stage)")


def split_features(workdir: str, split_arrays, split: str, apply_fn: Callable, variables,
                   preprocessing: str = "", batch_size: int = 256, progress: bool = True,
                   write: bool = True) -> FeatureSet:
  """The cached features of a loaded split (`load.SplitArrays`) under a backbone.

  Args:
    workdir: the run's directory (the cache lives in workdir/features).
    split_arrays: the split's images, labels, class names and dataset fingerprint.
    split: its name.
    apply_fn: uint8 [b, H, W, C] -> [b, D], the frozen backbone with its preprocessing.
    variables: the backbone's variables (their fingerprint keys the cache).
    preprocessing: a description of what apply_fn does besides the variables (for the key).
    batch_size: images per embedding call.
    progress: show a progress bar.
    write: whether this process writes the cache.
  """
  key = cache_key(split_arrays.fingerprint, split, variables_fingerprint(variables),
                  preprocessing)

  def compute():
    feats = embed(apply_fn, variables, split_arrays.images, batch_size, progress,
                  desc=f"embedding {split}", split=split)
    return feats, split_arrays.labels

  return cached_features(workdir, key, compute, split_arrays.num_classes, write)


@jax.jit
def gather(features: jax.Array, support_idx: jax.Array, query_idx: jax.Array):
  """Episode features from index batches.

  Args:
    features: [n, D] the split's features (on device).
    support_idx: [B, N*K] ints from `Episodes.support`.
    query_idx: [B, N*Q] ints from `Episodes.query`.

  Returns:
    (support [B, N*K, D], query [B, N*Q, D]).
  """
  return jnp.take(features, support_idx, axis=0), jnp.take(features, query_idx, axis=0)


def class_means(features, labels, num_classes: int) -> jax.Array:
  """[C, D] mean feature of each class over all its images (Algorithm 1, line 3)."""
  return prototypes.class_means(jnp.asarray(features), jnp.asarray(labels), num_classes)
