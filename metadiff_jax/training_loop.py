"""The training loop of every stage that trains: pretraining, diffusion training and the
baselines' meta-training.

    result = training_loop.run(step_fn, state, validate, run_dir=..., name=...,
                               schedule=training_loop.Schedule(...), latest=..., best=...)

The loop restores the newest intact checkpoint of the run (`restore_latest`) and, unless the
run is already done, calls `step_fn(state, step, count) -> (state, metrics)` until
`schedule.steps`, `count` at most `schedule.steps_per_call` steps at a time: one compiled
`lax.scan` of steps for diffusion training and the baselines, one step on a batch for
pretraining. The metrics of a call (the loss, or a dict with a "loss") stay on the device until
the next log, validation or checkpoint step; there the loop copies them to the host in one
sync, stops with a one-line `TrainingError` if a loss is not finite (naming the step and the
last good checkpoint), and writes their means. A step counts as a log (validation, checkpoint)
step when a call crosses a multiple of `log_every` (`validate_every`, `checkpoint_every`); the
last step is all three. At a validation step `validate(step, state)` measures the state
(`Validation`): the loop writes its metrics, keeps the state in `best` when its score beats
the best so far (the run's meta["best_val_accuracy"]), and saves the latest; at a checkpoint
step it saves the latest. A progress bar shows the steps, a `metrics.MetricWriter` writes
metrics.jsonl (and TensorBoard), and the curves are drawn into curves.png at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import numpy as np

from metadiff_jax import checkpoint, mesh, metrics
from metadiff_jax.errors import TrainingError


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the loop does what, in steps (0: never).

  Attributes:
    steps: the steps of the whole run.
    steps_per_call: the most steps one call of the step function runs.
    log_every: write the mean training metrics every so many steps.
    validate_every: validate, keep the best and save the latest every so many steps.
    checkpoint_every: save the latest every so many steps.
    validate_first: validate a run that starts at step 0 before its first step (the untrained
      state is a candidate for the best too). A run of 0 steps is always validated.
  """

  steps: int
  steps_per_call: int = 1
  log_every: int = 0
  validate_every: int = 0
  checkpoint_every: int = 0
  validate_first: bool = False


@dataclasses.dataclass(frozen=True)
class Validation:
  """What `validate(step, state)` measured.

  Attributes:
    score: the number the best checkpoint maximises (a validation accuracy).
    metrics: scalars written to the run's metrics at the step.
    best_metadata: the metadata saved with the state where it is the new best.
    best_meta: fields set in the run's meta besides "best_val_accuracy" where it is the new
      best, e.g. {"best_step": step}.
  """

  score: float
  metrics: dict
  best_metadata: dict
  best_meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Plot:
  """The curves drawn into the run's curves.png at the end (`metrics.plot_curves`)."""

  keys: tuple
  title: str
  logy_keys: tuple = ()


@dataclasses.dataclass(frozen=True)
class Result:
  """What `run` ends with.

  Attributes:
    state: the last state (restored, where the run was already done).
    meta: the run's meta, {"best_val_accuracy": the best score, ...}.
    trained: False where the run was already done and nothing ran.
  """

  state: Any
  meta: dict
  trained: bool


def restore_latest(store: checkpoint.Checkpoints, state, meta: dict, run_dir: str, what: str):
  """(state, meta) of the newest intact checkpoint in `store`, or the given ones if it has
  none. Unreadable newer steps are skipped with a log line (`checkpoint.Checkpoints.restore`).

  Raises:
    TrainingError: if the checkpoint does not fit `state` (a run of another config), or no
      step in `store` can be read.
  """
  if store.latest_step() is None:
    return state, meta
  state, meta = checkpoint.restore_or_raise(
      store, state,
      mismatch=lambda e: TrainingError(
          f"the checkpoint {e.directory}/{e.step} does not fit the config: {e.detail}; use the "
          f"config it was written with, or move {run_dir} aside to retrain this stage"),
      unreadable=lambda e: TrainingError(
          f"no intact checkpoint in {e.directory}: {e.detail}; move {run_dir} aside to retrain "
          "this stage (nothing is deleted)"))
  logging.info("%s: resumed from step %d", what, int(state.step))
  return state, meta


def run(step_fn: Callable, state, validate: Callable[[int, Any], Validation], *, run_dir: str,
        name: str, schedule: Schedule, latest: checkpoint.Checkpoints,
        best: checkpoint.Checkpoints, meta: dict, loss_name: str = "the loss",
        advice: str = "", log_extra: Callable[[int], dict] | None = None,
        plot: Plot | None = None) -> Result:
  """Trains `state` to `schedule.steps`, resuming from the latest checkpoint in `latest`.

  Args:
    step_fn: (state, step, count) -> (state, metrics): runs steps step..step + count - 1;
      `metrics` is the loss or a dict of metrics with a "loss", each [count] (or a scalar
      where count is 1), left on the device.
    state: the state at step 0 (replicated); the template of the checkpoints.
    validate: (step, state) -> `Validation`.
    run_dir: the run's directory (metrics.jsonl, TensorBoard, curves.png).
    name: the run's name in the log and on the progress bar, e.g. "train 1-shot".
    schedule: the steps and when to log, validate and save.
    latest, best: the stores of the latest and the best-validated states (the caller opens
      and closes them).
    meta: the run's meta at step 0 (saved with every latest checkpoint), e.g.
      {"best_val_accuracy": -1.0}.
    loss_name, advice: the error of a loss that is not finite reads "{loss_name} became nan at
      step 12; kept the last good checkpoint (step 10) in DIR; {advice}".
    log_extra: step -> scalars written beside the training metrics (e.g. the learning rate).
    plot: the curves to draw at the end, if any.

  Returns:
    `Result`. Where the run was already done (its latest step is `schedule.steps` or more and
    `best` holds a state), nothing runs and nothing is written.

  Raises:
    TrainingError: where a loss is not finite, or the latest checkpoint does not fit `state`.
  """
  meta = dict(meta)
  state, meta = restore_latest(latest, state, meta, run_dir, name)
  step = int(state.step)
  if step >= schedule.steps and best.latest_step() is not None:
    return Result(state, meta, trained=False)

  writer = metrics.MetricWriter(run_dir, enabled=mesh.is_writer(), resume_step=step)

  def validate_and_save(step, state, meta):
    v = validate(step, state)
    writer.write(step, v.metrics)
    if v.score > meta["best_val_accuracy"]:
      meta = {**meta, "best_val_accuracy": v.score, **v.best_meta}
      if best.latest_step() != step:
        best.save(step, state, v.best_metadata)
    latest.save(step, state, meta)
    return meta

  def fetch(pending) -> dict[str, float]:
    """The means of the pending metrics (one host sync), after a check for a non-finite loss."""
    values: dict[str, list] = {}
    fetched = jax.device_get([m for _, _, m in pending])
    for (first, count, _), m in zip(pending, fetched):
      m = m if isinstance(m, dict) else {"loss": m}
      m = {k: np.reshape(np.asarray(v, np.float64), (count,)) for k, v in m.items()}
      bad = np.flatnonzero(~np.isfinite(m["loss"]))
      if bad.size:
        raise TrainingError(f"{loss_name} became {m['loss'][bad[0]]} at step "
                            f"{first + bad[0] + 1}; {latest.kept()}; {advice}")
      for k, v in m.items():
        values.setdefault(k, []).append(v)
    return {k: float(np.concatenate(v).mean()) for k, v in values.items()}

  s = schedule
  bar = metrics.Progress(s.steps, name, initial=step, unit="step", enabled=mesh.is_writer())
  pending = []  # (first step, count, metrics on the device) of the calls since the last sync
  try:
    if (s.validate_first and step == 0) or s.steps == 0:
      meta = validate_and_save(step, state, meta)
    while step < s.steps:
      count = min(s.steps_per_call, s.steps - step)
      state, m = step_fn(state, step, count)
      pending.append((step, count, m))
      previous, step = step, step + count
      bar.update(count)
      crossed = lambda every: bool(every) and step // every > previous // every
      validate_due = crossed(s.validate_every) or step == s.steps
      save_due = crossed(s.checkpoint_every)
      if crossed(s.log_every) or validate_due or save_due:
        logged = fetch(pending)
        pending = []
        writer.write(step, {**logged, **(log_extra(step) if log_extra else {})})
        bar.update(0, loss=f"{logged['loss']:.4f}")
      if validate_due:
        meta = validate_and_save(step, state, meta)
      elif save_due:
        latest.save(step, state, meta)
  finally:
    bar.close()
    writer.close()
  if plot is not None and mesh.is_writer():
    records = metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    metrics.plot_curves(records, list(plot.keys), os.path.join(run_dir, "curves.png"),
                        title=plot.title, logy_keys=plot.logy_keys)
  return Result(state, meta, trained=True)
