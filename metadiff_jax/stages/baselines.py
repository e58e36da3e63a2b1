"""The meta-optimizer baselines of the analyses, trained and evaluated like MetaDiff.

Every baseline (`metadiff_jax.metaopt`) adapts a head's weights on a support set; here they
get the same frozen features, the same base-class episodes and the same test episodes as
MetaDiff:

- `tune_gda`: GDA and momentum GDA have nothing to meta-train; their learning rate and step
  count are chosen on validation episodes from a grid (the values are recorded).
- `train_method`: the bi-level baselines (ANIL, MetaLSTM, ALFA) are meta-trained on base
  episodes drawn on the device (`episodes.draw_episode`: N classes, K support and Q query
  images each), by differentiating the query loss through the unrolled inner loop. Steps run
  `steps_per_call` at a time in one `lax.scan` (`training_loop.run`); every `val_every_steps`
  the validation accuracy is measured and the best meta-parameters are kept, with checkpoints
  that resume.
- `run_episodes`: per-episode test accuracy of a method on host-drawn episodes
  (`episodes.EpisodeSampler`), the episode batch split over the data mesh as the eval stage
  does (`evaluator.evaluate_episodes`); the initial weights of episode i come from fold_in(key, i).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import checkpoint, evaluator, mesh, metaopt, training_loop
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.data import features


@functools.partial(jax.jit, static_argnames=("method",))
def episode_accuracy(method, params, features_dev, support_idx, support_labels, query_idx,
                     query_labels, index, key):
  """[B] query accuracy of `method` on a batch of episodes (index arrays as `Episodes`)."""
  support, query = features.gather(features_dev, support_idx, query_idx)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
  return metaopt.episode_accuracy(method, params, support, support_labels, query,
                                  query_labels, keys)


def run_episodes(method, params, features_dev, sampler: episodes_lib.EpisodeSampler,
                 count: int, batch: int, key, desc: str = "episodes",
                 progress: bool = True) -> np.ndarray:
  """[count] accuracies of episodes 0..count-1 of `sampler`, `batch` at a time."""
  return evaluator.evaluate_episodes(
      lambda e: episode_accuracy(method, params, features_dev, e.support, e.support_labels,
                                 e.query, e.query_labels, e.index, key),
      sampler, count, batch, desc=desc, progress=progress)


def tune_gda(make, grid: dict, val_dev, val_sampler, count: int, batch: int, key):
  """Picks the GDA setting with the best validation accuracy.

  Args:
    make: fields -> the method (e.g. `functools.partial(metaopt.GDA, head=..., ...)`).
    grid: {field: candidate values}, e.g. {"learning_rate": (...), "steps": (...)}.
    val_dev, val_sampler, count, batch, key: the validation episodes, as `run_episodes`.

  Returns:
    (the best method, {"best": fields, "val_accuracy": its accuracy, "grid": [every setting's
    fields and accuracy]}).
  """
  names = sorted(grid)
  tried, best = [], None
  for values in itertools.product(*(grid[n] for n in names)):
    fields = dict(zip(names, values))
    method = make(**fields)
    acc = run_episodes(method, {}, val_dev, val_sampler, count, batch, key, progress=False)
    mean = float(np.mean(acc)) if np.all(np.isfinite(acc)) else float("nan")
    tried.append({**fields, "val_accuracy": mean})
    if best is None or mean > best[1]:
      best = (method, mean, fields)
  logging.info("analysis: %s tuned on validation: %s (accuracy %.4f)", type(best[0]).__name__,
               best[2], best[1])
  return best[0], {"best": best[2], "val_accuracy": best[1], "grid": tried}


@functools.partial(
    jax.jit, static_argnames=("method", "num_steps", "episodes_per_step", "shots", "queries"),
    donate_argnums=(1,))
def train_steps(method, state, features_dev, table, episode_key, key, num_steps: int,
                episodes_per_step: int, shots: int, queries: int):
  """`num_steps` outer steps of bi-level meta-training in one `lax.scan`.

  Step s trains on base episodes s * B, ..., s * B + B - 1 (`episodes.draw_episode` from
  `episode_key`), split over the data mesh; `metaopt.meta_train_step` draws each episode's
  inner-loop randomness from fold_in(key, step).

  Returns:
    (state, losses [num_steps]).
  """
  ways = method.ways
  b = episodes_per_step
  support_labels = jnp.broadcast_to(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), shots),
                                    (b, ways * shots))
  query_labels = jnp.broadcast_to(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), queries),
                                  (b, ways * queries))
  draw = jax.vmap(episodes_lib.draw_episode, in_axes=(None, None, 0, None, None, None))

  def one_step(state, _):
    index = state.step * b + jnp.arange(b)
    support_idx, query_idx, _ = mesh.constrain(
        draw(table, episode_key, index, ways, shots, queries))
    support = jnp.take(features_dev, support_idx, axis=0)
    query = jnp.take(features_dev, query_idx, axis=0)
    return metaopt.meta_train_step(method, state, support, support_labels, query,
                                   query_labels, key)

  return jax.lax.scan(one_step, state, None, length=num_steps)


def train_method(method, out: str, settings, base_dev, table, val_dev, val_sampler, keys: dict,
                 name: str):
  """Meta-trains `method` in directory `out` (resuming), keeping the best validation params.

  Args:
    method: a trainable `metaopt` method.
    out: its directory (checkpoints/, best/, metrics.jsonl, curves.png).
    settings: the config's `analysis` section (steps, episodes, learning rate, validation).
    base_dev: [n, D] base features on the devices; table: their `ClassTable` (replicated).
    val_dev, val_sampler: the validation features and episodes; training episodes have the
      validation episodes' shots.
    keys: {"init", "episodes", "train", "val"} typed keys.
    name: for the log and progress bar.

  Returns:
    (the best meta-parameters, their metadata {"best_val_accuracy", "best_step"}).
  """
  a = settings

  def steps(state, step, count):
    del step  # the steps draw their episodes and randomness from state.step
    return train_steps(method, state, base_dev, table, keys["episodes"], keys["train"], count,
                       a.meta_episodes_per_step, val_sampler.shots, a.queries)

  def validate(step, state):
    acc = float(np.mean(run_episodes(method, state.params, val_dev, val_sampler,
                                     a.val_episodes, a.batch_episodes, keys["val"],
                                     progress=False)))
    logging.info("analysis %s: step %d, validation accuracy %.4f", name, step, acc)
    return training_loop.Validation(score=acc, metrics={"val_accuracy": acc},
                                    best_metadata={"val_accuracy": acc},
                                    best_meta={"best_step": step})

  state = mesh.replicate(metaopt.create_state(method, keys["init"], a.meta_learning_rate))
  latest = checkpoint.Checkpoints(os.path.join(out, "checkpoints"), max_to_keep=1)
  best = checkpoint.Checkpoints(os.path.join(out, "best"), max_to_keep=1)
  try:
    result = training_loop.run(
        steps, state, validate, run_dir=out, name=f"meta-train {name}",
        schedule=training_loop.Schedule(
            steps=a.meta_steps, steps_per_call=a.steps_per_call, log_every=a.log_every_steps,
            validate_every=a.val_every_steps, validate_first=True),
        latest=latest, best=best, meta={"best_val_accuracy": -1.0, "best_step": -1},
        loss_name=f"the meta-training loss of {name}",
        advice="lower config.analysis.meta_learning_rate",
        plot=training_loop.Plot(("loss", "val_accuracy"), f"meta-training {name}",
                                logy_keys=("loss",)))
    best_state, _ = best.restore(result.state)  # its metadata is the validation accuracy alone
  finally:
    latest.close()
    best.close()
  return best_state.params, result.meta
