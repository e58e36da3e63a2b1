"""Checkpoints of a stage's state: the one module behind which Orbax lives.

Every stage (pretraining, prototypes, diffusion training, evaluation) checkpoints one pytree,
usually a `flax.training.train_state.TrainState` subclass, into its workdir and restores the
latest one when it starts again. Orbax's API has changed several times (the `args.Composite`
style replaced the `Checkpointer` style in 0.5), so nothing else in the package imports it:
an Orbax change touches this file only.

Each step is a directory `<directory>/<step>/` holding two items: `state` (the arrays, in
Orbax's standard pytree format) and `metadata` (a small JSON dict, e.g. validation accuracy or
whether the stage has finished), which can be read without restoring any array.

Saving is atomic: Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it to `<step>`
only once everything (including its `commit_success.txt`) is written, and it lists only
directories named as plain steps. A process killed while saving therefore leaves the previous
checkpoint as the latest one; Orbax removes the stale tmp directory when that step is saved
again (as a resumed run does).

Several processes: Orbax's `CheckpointManager` is collective. With `jax.distributed` started,
every process constructs `Checkpoints` on the same (shared) directory and calls `save` and
`restore` with the same step; Orbax writes each process's shards and lets process 0 commit.
Nothing here is process-specific.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_METADATA = "metadata"


class Checkpoints:
  """The checkpoints of one stage, in one directory.

  Example:
    ckpts = Checkpoints(workdir + "/checkpoints")
    if ckpts.latest_step() is not None:
      state, meta = ckpts.restore(state)
    ...
    ckpts.save(step, state, {"val_accuracy": acc})
  """

  def __init__(self, directory: str, max_to_keep: int | None = 2):
    """Opens (and creates) a checkpoint directory.

    Args:
      directory: where the step directories live; created if missing.
      max_to_keep: how many of the latest checkpoints to keep; None keeps all.
    """
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        # Synchronous, so that `save` returning means the step is committed: a stage that
        # saves and then exits (or is killed) never loses the step it reported. Saves here are
        # rare next to the training steps between them, so overlapping them buys little.
        enable_async_checkpointing=False,
        # Not cleaning tmp directories on opening: another process opening the same directory
        # (an evaluation watching a training run) would delete a save in progress. A save
        # killed midway leaves its tmp directory until that step is saved again, which is
        # what a resumed run does.
        cleanup_tmp_directories=False,
    )
    # Registering the handlers up front lets a fresh manager read metadata without having
    # saved or restored first.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _METADATA: ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    """The latest committed step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All committed steps, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, metadata: dict | None = None) -> None:
    """Saves `state` as `step` and returns once it is committed.

    Args:
      step: the step number; must be greater than every step already saved.
      state: any pytree of arrays and Python scalars (e.g. a TrainState subclass).
      metadata: a JSON-serialisable dict stored alongside (e.g. {"done": True}).

    Raises:
      ValueError: if `step` is not after the latest saved step (Orbax would silently skip
        such a save, and a skipped save that claims to have happened is worse than an error).
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(
          f"cannot save step {step} in {self.directory}: it already holds step {latest}, and"
          " checkpoints only move forward")
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _METADATA: ocp.args.JsonSave(dict(metadata or {})),
        }),
        # The step check above is the policy; Orbax's save-interval logic must not veto it.
        force=True,
    )
    if not saved:
      raise RuntimeError(f"Orbax declined to save step {step} in {self.directory}")
    self._manager.wait_until_finished()

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores a step into the structure, shardings and dtypes of `template`.

    Args:
      template: a pytree like the saved one (e.g. a freshly initialised TrainState); its
        arrays may be concrete or `jax.ShapeDtypeStruct`s. Arrays are restored with its
        shardings and cast to its dtypes.
      step: which step; the latest when None.

    Returns:
      (state, metadata): the restored pytree (of the template's type) and the saved dict.

    Raises:
      FileNotFoundError: if there is no such checkpoint.
      ValueError: if the checkpoint's structure or shapes do not fit `template`.
    """
    step = self._existing_step(step)
    self._check_fits(template, step)
    abstract = jax.tree.map(_abstract_leaf, template)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardRestore(abstract),
              _METADATA: ocp.args.JsonRestore(),
          }))
    except ValueError as e:
      # The check above catches what we know of; anything else Orbax rejects is still the
      # user's checkpoint not fitting, so say so on one line.
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(self._mismatch(step, first_line)) from e
    return restored[_STATE], dict(restored[_METADATA] or {})

  def restore_saved(self, step: int | None = None) -> tuple[Any, dict]:
    """Restores a step as it was saved, without a template: nested dicts of arrays.

    For readers that need part of a state whose full template they cannot build (`predict`
    takes the backbone out of a pretraining state without the dataset that sized its head).

    Returns:
      (tree, metadata): dataclasses and named tuples come back as dicts of their fields.

    Raises:
      FileNotFoundError: if there is no such checkpoint.
    """
    step = self._existing_step(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(),
            _METADATA: ocp.args.JsonRestore(),
        }))
    return restored[_STATE], dict(restored[_METADATA] or {})

  def metadata(self, step: int | None = None) -> dict:
    """The metadata dict saved with a step (the latest when None), without reading arrays.

    Raises:
      FileNotFoundError: if there is no such checkpoint.
    """
    step = self._existing_step(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
    return dict(restored[_METADATA] or {})

  def close(self) -> None:
    """Waits for pending work and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _existing_step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}")
    return step

  def _check_fits(self, template: Any, step: int) -> None:
    """Raises a one-line ValueError naming the first paths where checkpoint and template differ."""
    try:
      saved_tree = self._manager.item_metadata(step)[_STATE].tree
    except Exception:  # pylint: disable=broad-except
      # Checkpoints whose metadata Orbax cannot read are still checked by the restore itself.
      return
    # Paths as names and indices: the saved metadata tree holds dicts and lists where the
    # template holds dataclasses and named tuples (and Orbax's own tree utilities fail on the
    # empty states of optax chains).
    saved = {_path(k): tuple(getattr(v, "shape", ()) or ())
             for k, v in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    wanted = {_path(k): tuple(np.shape(v))
              for k, v in jax.tree_util.tree_flatten_with_path(template)[0]}
    problems = []
    missing = sorted(set(wanted) - set(saved))
    if missing:
      problems.append(f"missing {_some(missing)}")
    unexpected = sorted(set(saved) - set(wanted))
    if unexpected:
      problems.append(f"not in the template {_some(unexpected)}")
    reshaped = [f"{k} {saved[k]} vs {wanted[k]}"
                for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    if reshaped:
      problems.append(f"shapes (saved vs template) {_some(reshaped)}")
    if problems:
      raise ValueError(self._mismatch(step, "; ".join(problems)))

  def _mismatch(self, step: int, detail: str) -> str:
    return (f"checkpoint {self.directory}/{step} does not fit this run's state ({detail}):"
            f" delete {self.directory} or use the config it was written with")


def read_latest(directory: str) -> tuple[Any, dict] | None:
  """(tree, metadata) of the latest checkpoint in `directory` as saved (`restore_saved`), or
  None where the directory holds none."""
  if not os.path.isdir(directory):
    return None
  with Checkpoints(directory, max_to_keep=1) as store:
    if store.latest_step() is None:
      return None
    return store.restore_saved()


def _abstract_leaf(leaf: Any) -> Any:
  # jax.Arrays become ShapeDtypeStructs carrying their sharding, so the restore places each
  # shard where the template's does; host arrays and Python scalars serve as their own
  # templates.
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


def _path(key: tuple) -> str:
  names = []
  for k in key:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return "/".join(names)


def _some(items: list[str], limit: int = 3) -> str:
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more
