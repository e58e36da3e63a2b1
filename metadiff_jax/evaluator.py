"""The episodic evaluator: a per-episode function over episodes 0..count-1 of a sampler.

Every evaluation (the eval stage's rows, validation during training, the baselines, the
analysis and stability rows, the pretraining check) is the same loop: draw a batch of episodes,
split it over the data mesh, run a jitted function on it, copy the per-episode values to the
host and concatenate. `evaluate_episodes` is that loop; the padding of a batch to a multiple
of the device count, the sharding (`mesh.shard_rows`: each process draws only the episodes its
devices hold), the trimming of the padding and the concatenation live here alone.

Which episodes: episode i of an evaluation is episode i of `episodes.EpisodeSampler` (drawn on
the host with NumPy's PCG64 from (seed, split, i)), while episode i of training is that of
`episodes.draw_support` (drawn on the device from (key, i) inside the compiled steps). The
evaluation episodes are defined without JAX, so they are the same on every platform, JAX
version and device count, and the published accuracy tables (the README's, the configs')
are keyed on them; training episodes are drawn where the steps run, so that a `lax.scan` of
steps needs no host round trip.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

from metadiff_jax import heads, mesh, metrics, prototypes
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.data import features


def sharded_episodes(sampler: episodes_lib.EpisodeSampler, start: int,
                     batch: int) -> episodes_lib.Episodes:
  """Episodes start..start + batch - 1 of `sampler`, split over the mesh.

  Each process draws only the episodes its devices hold (`mesh.shard_rows`).

  Args:
    sampler: the episode sampler.
    start: the first episode's index.
    batch: B, a multiple of the device count.

  Returns:
    `episodes.Episodes` of global arrays with leading axis B split over the mesh, its
    `index` [B] int32.
  """
  def rows(a, b):
    eps = sampler.batch(start + a, b - a)
    return eps._replace(index=eps.index.astype(np.int32))
  return mesh.shard_rows(batch, rows)


def evaluate_episodes(fn: Callable[[episodes_lib.Episodes], Any],
                      sampler: episodes_lib.EpisodeSampler, count: int, batch: int, *,
                      desc: str = "episodes", progress: bool = False):
  """The values of `fn` on episodes 0..count-1 of `sampler`, `batch` at a time.

  Each batch is rounded up to a multiple of the device count and always has that size, so a
  jitted `fn` compiles once; the episodes past `count` of the last batch are drawn, computed
  and dropped.

  Args:
    fn: `episodes.Episodes` of B episodes (global arrays split over the mesh, `index` int32)
      -> a pytree (an array, a dict of arrays) of per-episode values, each with leading axis
      B; typically a call of a jitted function of the episodes' index arrays.
    sampler: the episode sampler (`episodes.EpisodeSampler`).
    count: how many episodes (at least 1).
    batch: episodes per call, before rounding up to a multiple of the device count.
    desc: the progress bar's label.
    progress: whether to show a progress bar (on the writer process).

  Returns:
    `fn`'s pytree with every leaf a host numpy array [count, ...], the same on every process.
  """
  if count < 1:
    raise ValueError(f"evaluate_episodes needs at least one episode, got count={count}")
  batch = mesh.padded_size(min(batch, count))
  parts = []
  with metrics.Progress(count, desc, unit="episode",
                        enabled=progress and mesh.is_writer()) as bar:
    for start in range(0, count, batch):
      keep = min(batch, count - start)
      values = fn(sharded_episodes(sampler, start, batch))
      parts.append(jax.tree_util.tree_map(lambda x, keep=keep: mesh.to_host(x)[:keep], values))
      bar.update(keep)
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)


@functools.partial(jax.jit, static_argnames=("ways", "transductive_steps"))
def prototype_accuracy(features_dev, support_idx, support_labels, query_idx, query_labels,
                       ways: int, shrinkage=None, transductive_steps: int = 0):
  """[B] query accuracy of class-mean prototypes under 10 x cosine (the pretrain check), or,
  where `shrinkage` (a `prototypes.LinearShrinkage`) is given, of the shrunk class means;
  `transductive_steps` > 0 then refines them with the episode's unlabelled queries
  (`prototypes.refine_with_queries`).

  Args:
    features_dev: [n, D] the split's features.
    support_idx, support_labels: [B, N*K]; query_idx, query_labels: [B, N*Q]
      (`episodes.Episodes`).
    ways: N.
  """
  support, query = features.gather(features_dev, support_idx, query_idx)
  protos = jax.vmap(prototypes.class_means, (0, 0, None))(support, support_labels, ways)
  if shrinkage is not None:
    protos = shrinkage(protos)
  if transductive_steps:
    protos = jax.vmap(functools.partial(prototypes.refine_with_queries,
                                        steps=transductive_steps))(
        protos, support, support_labels, query)
  return jax.vmap(functools.partial(heads.accuracy, "prototype"))(protos, query, query_labels)


def class_mean_accuracy(features_dev, sampler: episodes_lib.EpisodeSampler, count: int,
                        batch: int, shrinkage=None, transductive_steps: int = 0) -> np.ndarray:
  """[count] accuracy of class-mean prototypes (10 x cosine) on the sampler's episodes.

  Args:
    features_dev: [n, D] the split's features on the devices (`mesh.replicate`).
    sampler, count, batch: as `evaluate_episodes`.
    shrinkage: None, or a `prototypes.LinearShrinkage` applied to the class means.
    transductive_steps: soft k-means rounds over the queries after that (0: inductive).
  """
  return evaluate_episodes(
      lambda e: prototype_accuracy(features_dev, e.support, e.support_labels, e.query,
                                   e.query_labels, ways=sampler.ways, shrinkage=shrinkage,
                                   transductive_steps=transductive_steps),
      sampler, count, batch)
