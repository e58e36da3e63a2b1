"""The episode sampler: N-way K-shot episodes as a pure function of (seed, split, index).

Episode i of a split under a seed draws N of the split's classes, then K support and Q query
images of each, all without replacement, and relabels the classes 0..N-1 in the order drawn.
It depends on nothing else: not on the batch size, the number of processes, or what was drawn
before. So evaluation episodes are identical across runs, batch sizes and machines, and a
resumed run draws the same training episodes as an uninterrupted one.

Episodes are index arrays into the split (host numpy; tiny next to the images they point at).
A batch has a leading episode axis. Sharding is by episode index: batch b of a run holds
episodes [b * B, (b + 1) * B); process p of P takes the p-th contiguous slice of B / P of them,
so 1 or 8 processes together see exactly the same episodes.

The random stream is NumPy's PCG64 seeded with (seed, crc32(split), i) through SeedSequence,
which NumPy documents as stable across platforms and versions.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax.data.errors import DataError


class Episodes(NamedTuple):
  """A batch of episodes as indices into one split (leading axis: B episodes).

  Attributes:
    support: [B, N*K] int32 image indices, class-major (class 0's K shots first).
    support_labels: [B, N*K] int32 episode labels in [0, N).
    query: [B, N*Q] int32 image indices, class-major.
    query_labels: [B, N*Q] int32 episode labels in [0, N).
    classes: [B, N] int32 split-level class of each episode label.
    index: [B] int64 episode indices.
  """

  support: np.ndarray
  support_labels: np.ndarray
  query: np.ndarray
  query_labels: np.ndarray
  classes: np.ndarray
  index: np.ndarray


class EpisodeSampler:
  """Draws N-way K-shot Q-query episodes from a split's labels.

  Args:
    labels: [n] ints in [0, C), the split's within-split class labels.
    ways: N classes per episode.
    shots: K support images per class.
    queries: Q query images per class (0 for support-only episodes).
    seed: the run's data seed.
    split: the split's name; it enters the random stream, so that train and test episodes
      under one seed differ.

  Raises:
    DataError: if the split cannot supply such episodes (N above its class count, K + Q above
      its smallest class), with the numbers.
  """

  def __init__(self, labels: np.ndarray, ways: int, shots: int, queries: int, seed: int,
               split: str):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    for name, value, low in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
      if int(value) != value or value < low:
        raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
    if int(seed) != seed or seed < 0:
      raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if labels.size and labels.min() < 0:
      raise DataError("labels must be non-negative class indices")
    counts = np.bincount(labels, minlength=num_classes)
    if ways > num_classes:
      raise DataError(f"{ways}-way episodes need {ways} classes but split {split!r} has "
                      f"{num_classes}; lower ways to at most {num_classes}")
    present = counts[counts > 0]
    if len(present) < num_classes:
      raise DataError(f"split {split!r}: classes {np.flatnonzero(counts == 0)[:5].tolist()} have"
                      " no images; labels must cover 0..C-1")
    smallest = int(present.min())
    if shots + queries > smallest:
      raise DataError(f"{shots}-shot {queries}-query episodes need {shots + queries} images per "
                      f"class but split {split!r} has a class (label "
                      f"{int(np.argmin(counts))}) with only {smallest}; lower shots + queries to "
                      f"at most {smallest}")
    self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
    self.seed, self.split = int(seed), split
    self.num_classes = num_classes
    # Images of class c are order[starts[c]:starts[c] + counts[c]], in index order.
    self._order = np.argsort(labels, kind="stable").astype(np.int32)
    self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    self._counts = counts.astype(np.int64)
    self._split_key = zlib.crc32(split.encode())

  def _rng(self, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence([self.seed, self._split_key, int(index)])))

  def episode(self, index: int) -> Episodes:
    """Episode `index` alone (a batch of one)."""
    return self.batch(index, 1)

  def batch(self, start: int, count: int) -> Episodes:
    """Episodes start, start + 1, ..., start + count - 1, stacked."""
    if start < 0 or count < 0:
      raise DataError(f"episode indices must be non-negative, got start={start} count={count}")
    n, k, q = self.ways, self.shots, self.queries
    support = np.empty((count, n, k), np.int32)
    query = np.empty((count, n, q), np.int32)
    classes = np.empty((count, n), np.int32)
    for b in range(count):
      rng = self._rng(start + b)
      chosen = rng.choice(self.num_classes, size=n, replace=False)
      classes[b] = chosen
      for j, c in enumerate(chosen):
        picks = rng.choice(self._counts[c], size=k + q, replace=False)
        members = self._order[self._starts[c] + picks]
        support[b, j] = members[:k]
        query[b, j] = members[k:]
    episode_labels = np.arange(n, dtype=np.int32)
    return Episodes(
        support=support.reshape(count, n * k),
        support_labels=np.broadcast_to(np.repeat(episode_labels, k), (count, n * k)).copy(),
        query=query.reshape(count, n * q),
        query_labels=np.broadcast_to(np.repeat(episode_labels, q), (count, n * q)).copy(),
        classes=classes,
        index=np.arange(start, start + count, dtype=np.int64),
    )

  def shard(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> Episodes:
    """This process's share of batch `step` of `global_batch` episodes.

    Batch `step` is episodes [step * global_batch, (step + 1) * global_batch); process p takes
    the p-th of `process_count` equal contiguous slices.
    """
    if global_batch % process_count:
      raise DataError(f"a batch of {global_batch} episodes does not split evenly over "
                      f"{process_count} processes; make it a multiple of {process_count}")
    if not 0 <= process_index < process_count:
      raise DataError(f"process_index {process_index} outside [0, {process_count})")
    local = global_batch // process_count
    return self.batch(step * global_batch + process_index * local, local)


def concat(parts: list[Episodes]) -> Episodes:
  """Episodes of several batches along the episode axis (e.g. the shards of all processes)."""
  return Episodes(*(np.concatenate(xs) for xs in zip(*parts)))


# ----------------------------------------------------------------------------- on device

class ClassTable(NamedTuple):
  """A split's images grouped by class, for drawing episodes on the device.

  Attributes:
    members: [C, M] int32; row c lists the image indices of class c in index order, padded
      (with 0) to M, the size of the largest class.
    counts: [C] int32 images per class.
  """

  members: np.ndarray
  counts: np.ndarray


def class_table(labels: np.ndarray) -> ClassTable:
  """The ClassTable of a split's labels [n] (ints in [0, C), every class present)."""
  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1
  counts = np.bincount(labels, minlength=num_classes)
  if np.any(counts == 0):
    raise DataError(f"classes {np.flatnonzero(counts == 0)[:5].tolist()} have no images; "
                    "labels must cover 0..C-1")
  members = np.zeros((num_classes, int(counts.max())), np.int32)
  order = np.argsort(labels, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  for c in range(num_classes):
    members[c, :counts[c]] = order[starts[c]:starts[c] + counts[c]]
  return ClassTable(members, counts.astype(np.int32))


def check_support_episodes(table: ClassTable, ways: int, shots: int, split: str) -> None:
  """Raises DataError if the split cannot supply N-way K-shot support sets."""
  num_classes, smallest = len(table.counts), int(table.counts.min())
  if ways > num_classes:
    raise DataError(f"{ways}-way episodes need {ways} classes but split {split!r} has "
                    f"{num_classes}; lower ways to at most {num_classes}")
  if shots > smallest:
    raise DataError(f"{shots}-shot episodes need {shots} images per class but split {split!r} "
                    f"has a class with only {smallest}; lower shots to at most {smallest}")


def draw_support(table: ClassTable, key, index, ways: int, shots: int):
  """Support set of episode `index`, drawn on the device as a pure function of (key, index).

  The diffusion-training counterpart of `EpisodeSampler` (which draws evaluation episodes on
  the host): N classes without replacement, then K images of each without replacement, from
  the stream fold_in(key, index). jit- and vmap-able; an episode does not depend on the batch
  it is drawn in or on how that batch is split over devices.

  Args:
    table: the split's ClassTable (as device or host arrays).
    key: a typed PRNG key.
    index: int scalar, the episode index.
    ways: N. shots: K.

  Returns:
    (support [N*K] int32 image indices, class-major; classes [N] int32 split classes). The
    episode labels are `repeat(arange(N), K)`.
  """
  class_key, image_key = jax.random.split(jax.random.fold_in(key, index))
  num_classes, max_count = table.members.shape
  classes = jax.random.choice(class_key, num_classes, (ways,), replace=False)
  counts = jnp.asarray(table.counts)[classes]  # [N]
  # K of a class's images without replacement: the K smallest of uniform keys, with the
  # padding past the class's count pushed beyond every real key.
  u = jax.random.uniform(image_key, (ways, max_count))
  u = jnp.where(jnp.arange(max_count) < counts[:, None], u, 2.0)
  _, positions = jax.lax.top_k(-u, shots)  # [N, K]
  members = jnp.asarray(table.members)[classes]  # [N, M]
  support = jnp.take_along_axis(members, positions, axis=1)
  return support.reshape(ways * shots).astype(jnp.int32), classes.astype(jnp.int32)


def draw_episode(table: ClassTable, key, index, ways: int, shots: int, queries: int):
  """Support and query set of episode `index`, drawn on the device (bi-level meta-training).

  The support set is exactly `draw_support(table, key, index, ways, shots)`'s; the Q queries
  of each class are K + Q images drawn together without replacement, so no query is also a
  support image.

  Args:
    table, key, index, ways, shots: as in `draw_support`.
    queries: Q, query images per class.

  Returns:
    (support [N*K], query [N*Q] int32 image indices, class-major; classes [N] int32). The
    labels are `repeat(arange(N), K)` and `repeat(arange(N), Q)`.
  """
  # top_k returns the positions in order of their keys, so the first K of the K + Q smallest
  # are the K smallest: the support set of `draw_support`.
  both, classes = draw_support(table, key, index, ways, shots + queries)
  both = both.reshape(ways, shots + queries)
  support = both[:, :shots].reshape(ways * shots)
  query = both[:, shots:].reshape(ways * queries)
  return support, query, classes
