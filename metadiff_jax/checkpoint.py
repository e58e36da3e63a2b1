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

Any layout: a checkpoint records the shardings it was written with (8 devices, 2 processes),
and Orbax restores onto exactly those unless told otherwise, which fails with a topology
mismatch on any other layout. Every read here therefore names the current process's
shardings: `restore` those of its template (a template leaf without one is replicated over the
current mesh), `restore_saved` the current mesh's replicated sharding for every array. So
predict, the importer, eval and a resumed stage read a checkpoint of any device layout and
process count on any other.

Unreadable steps: a step whose files were truncated or garbled after it was committed (a full
disk, a bad copy) is skipped when the latest step is asked for: the reader logs one line naming
the step and why, and takes the newest intact one. The unreadable step stays where it is until
this directory must save a step at or below it; it is then renamed `<step>.unreadable` (which
Orbax does not list), with a log line, so that nothing is deleted. Only when no step is intact
is it an error (`UnreadableCheckpointError`); a checkpoint of another config's shapes is a
`CheckpointMismatchError`, never taken for an unreadable one.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from metadiff_jax import mesh
from metadiff_jax.errors import StageError

_STATE = "state"
_METADATA = "metadata"
_UNREADABLE_SUFFIX = ".unreadable"
_REASON_CHARS = 160  # of the cause an unreadable step is reported with
_DETAIL_CHARS = 240  # of the description of a mismatch


class CheckpointMismatchError(StageError):
  """A checkpoint whose tree paths or shapes differ from the template's: another config's.

  Attributes:
    directory, step: the checkpoint.
    detail: the first difference in words, e.g. "params/Dense_0/kernel has shape (512, 128)
      in the checkpoint and (256, 128) in this config" (and how many more), for callers that
      give their own advice.
  """

  def __init__(self, directory: str, step: int, detail: str):
    self.directory, self.step, self.detail = directory, step, detail
    super().__init__(f"the checkpoint {directory}/{step} does not fit this config: {detail};"
                     " use the config it was written with, or move the stage folder "
                     f"{os.path.dirname(directory)} aside")


class UnreadableCheckpointError(StageError):
  """No step that was asked for can be read: its files are truncated, garbled or missing.

  Attributes:
    directory: the checkpoint directory.
    reasons: {step: why it cannot be read}, newest first.
    detail: the same in words, for callers that give their own advice.
  """

  def __init__(self, directory: str, reasons: dict[int, str]):
    self.directory, self.reasons = directory, dict(reasons)
    steps = list(self.reasons)
    newest = steps[0]
    which = (f"step {newest} is" if len(steps) == 1 else
             f"steps {', '.join(map(str, steps))} are")
    self.detail = f"{which} unreadable (step {newest}: {self.reasons[newest]})"
    # The stage folder, not the checkpoint folder alone: a stage whose `checkpoints` say it is
    # done does not rewrite a missing `best`.
    super().__init__(f"no intact checkpoint in {directory}: {self.detail}; move the stage "
                     f"folder {os.path.dirname(directory)} aside (nothing is deleted) and rerun "
                     "the stage that writes it")


class _Unreadable(Exception):
  """One step's files could not be read; `reason` says why, in one short line."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


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
    # {step: reason} of the steps found unreadable, newest first: `save` may set them aside.
    self._unreadable: dict[int, str] = {}
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
      step: the step number; must be greater than every step already saved, except steps
        found unreadable, which are set aside (renamed `<step>.unreadable`) to make room.
      state: any pytree of arrays and Python scalars (e.g. a TrainState subclass).
      metadata: a JSON-serialisable dict stored alongside (e.g. {"done": True}).

    Raises:
      ValueError: if `step` is not after the latest saved step (Orbax would silently skip
        such a save, and a skipped save that claims to have happened is worse than an error).
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      in_the_way = [s for s in self.all_steps() if s >= step]
      if not all(s in self._unreadable for s in in_the_way):
        raise ValueError(
            f"cannot save step {step} in {self.directory}: it already holds step {latest}, and"
            " checkpoints only move forward")
      self._set_aside(in_the_way, step)
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
        shardings (replicated over the current mesh where a leaf has none), whatever layout
        wrote them, and cast to its dtypes.
      step: which step; when None, the newest intact one (unreadable newer ones are skipped
        with a log line).

    Returns:
      (state, metadata): the restored pytree (of the template's type) and the saved dict.

    Raises:
      FileNotFoundError: if there is no such checkpoint.
      CheckpointMismatchError: if the checkpoint's tree paths or shapes do not fit `template`.
      UnreadableCheckpointError: if the step (or, for None, every step) cannot be read.
    """
    abstract = jax.tree.map(_abstract_leaf, template)

    def read(step):
      self._check_fits(template, self._saved_tree(step), step)
      return self._read_state(step, abstract), self._read_metadata(step)

    return self._read_intact(step, read)

  def restore_saved(self, step: int | None = None) -> tuple[Any, dict]:
    """Restores a step as it was saved, without a template: nested dicts of arrays.

    For readers that need part of a state whose full template they cannot build (`predict`
    takes the backbone out of a pretraining state without the dataset that sized its head).
    Device arrays come back replicated over the current mesh, whatever layout wrote them;
    host (numpy) arrays and Python scalars as they were saved.

    Returns:
      (tree, metadata): dataclasses and named tuples come back as dicts of their fields.

    Raises:
      FileNotFoundError: if there is no such checkpoint.
      UnreadableCheckpointError: as in `restore`.
    """
    def read(step):
      target = jax.tree.map(_saved_leaf_target, self._saved_tree(step))
      return self._read_state(step, target), self._read_metadata(step)

    return self._read_intact(step, read)

  def metadata(self, step: int | None = None) -> dict:
    """The metadata dict saved with a step (the newest intact one when None), without reading
    arrays.

    Raises:
      FileNotFoundError: if there is no such checkpoint.
      UnreadableCheckpointError: as in `restore`.
    """
    return self._read_intact(step, self._read_metadata)

  def kept(self) -> str:
    """What a run stopped by an error leaves here, for its message: "kept the last good
    checkpoint (step 20) in DIR", or "no checkpoint was saved before it (DIR holds none)"."""
    intact = [s for s in self.all_steps() if s not in self._unreadable]
    if not intact:
      return f"no checkpoint was saved before it ({self.directory} holds none)"
    step = intact[-1]
    return f"kept the last good checkpoint (step {step}) in {self.directory}"

  def close(self) -> None:
    """Waits for pending work and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _read_intact(self, step: int | None, read: Callable[[int], Any]) -> Any:
    """`read(step)`; for step None, of the newest step that `read` does not find unreadable.

    Raises:
      FileNotFoundError: if there is no such step (or none at all).
      UnreadableCheckpointError: if the given step, or every step, is unreadable.
    """
    _quiet_abandoned_reads()
    if step is not None:
      steps = [self._existing_step(step)]
    else:
      steps = sorted(self.all_steps(), reverse=True)
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    skipped: dict[int, str] = {}  # newly found unreadable, to log
    for candidate in steps:
      if step is None and candidate in self._unreadable:  # found before: skipped quietly
        continue
      try:
        result = read(candidate)
      except _Unreadable as e:
        skipped[candidate] = e.reason
        self._unreadable[candidate] = e.reason
        continue
      if skipped:
        newest = next(iter(skipped))
        which = (f"step {newest} in {self.directory} is" if len(skipped) == 1 else
                 f"steps {', '.join(map(str, skipped))} in {self.directory} are")
        logging.warning("checkpoint %s unreadable (%s); using step %d, the newest intact one",
                        which, skipped[newest], candidate)
      return result
    raise UnreadableCheckpointError(
        self.directory, {s: self._unreadable[s] for s in steps if s in self._unreadable})

  def _saved_tree(self, step: int) -> Any:
    """The saved state's tree of Orbax metadata (shapes, dtypes, shardings), or _Unreadable."""
    try:
      saved = self._manager.item_metadata(step)[_STATE]
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and tensorstore raise many types for damaged files (JSON, OS, value errors).
      raise _Unreadable(f"its arrays cannot be read: {_cause(e, self._step_dir(step))}")
    if saved is None:  # Orbax found no readable `state` item
      raise _Unreadable(f"its {_STATE} item is missing or incomplete")
    return saved.tree

  def _read_state(self, step: int, target: Any) -> Any:
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))
    except Exception as e:  # pylint: disable=broad-except
      # The paths and shapes fit (checked before), so a failure here is damaged data.
      raise _Unreadable(f"its arrays cannot be read: {_cause(e, self._step_dir(step))}")
    return restored[_STATE]

  def _read_metadata(self, step: int) -> dict:
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
      return dict(restored[_METADATA] or {})
    except Exception as e:  # pylint: disable=broad-except
      raise _Unreadable(f"its metadata cannot be read: {_cause(e, self._step_dir(step))}")

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _existing_step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}")
    return step

  def _set_aside(self, steps: list[int], saving: int) -> None:
    """Renames unreadable steps to `<step>.unreadable` (kept, but no longer listed), to save
    step `saving`."""
    for step in steps:
      source = self._step_dir(step)
      target = source + _UNREADABLE_SUFFIX
      n = 1
      while os.path.exists(target):
        n += 1
        target = f"{source}{_UNREADABLE_SUFFIX}{n}"
      if mesh.is_writer() and os.path.isdir(source):
        os.rename(source, target)
        logging.warning("moved the unreadable checkpoint step %d to %s (kept, not deleted) to "
                        "save step %d", step, target, saving)
      self._unreadable.pop(step)
    mesh.barrier(f"checkpoint-set-aside-{self.directory}")
    self._manager.reload()

  def _check_fits(self, template: Any, saved_tree: Any, step: int) -> None:
    """Raises a one-line CheckpointMismatchError naming the first path where checkpoint and
    template differ (and how many more do)."""
    # Paths as names and indices: the saved metadata tree holds dicts and lists where the
    # template holds dataclasses and named tuples (and Orbax's own tree utilities fail on the
    # empty states of optax chains).
    saved = {_path(k): tuple(getattr(v, "shape", ()) or ())
             for k, v in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    wanted = {_path(k): tuple(np.shape(v))
              for k, v in jax.tree_util.tree_flatten_with_path(template)[0]}
    problems = [f"{k} has shape {saved[k]} in the checkpoint and {wanted[k]} in this config"
                for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    problems += [f"{k} is in this config but not in the checkpoint"
                 for k in sorted(set(wanted) - set(saved))]
    problems += [f"{k} is in the checkpoint but not in this config"
                 for k in sorted(set(saved) - set(wanted))]
    if problems:
      detail = _clip(problems[0], _DETAIL_CHARS)
      if len(problems) > 1:
        detail += f" (and {len(problems) - 1} more differences)"
      raise CheckpointMismatchError(self.directory, step, detail)


def restore_or_raise(store: Checkpoints, template: Any, step: int | None = None, *,
                     mismatch, unreadable) -> tuple[Any, dict]:
  """`store.restore(template, step)`, its two failures turned into the caller's errors.

  Args:
    mismatch: CheckpointMismatchError -> the exception to raise where the checkpoint does not
      fit `template` (a run of another config).
    unreadable: UnreadableCheckpointError -> the exception to raise where no step can be read.
  """
  try:
    return store.restore(template, step)
  except CheckpointMismatchError as e:
    raise mismatch(e) from None
  except UnreadableCheckpointError as e:
    raise unreadable(e) from None


def read_latest(directory: str) -> tuple[Any, dict] | None:
  """(tree, metadata) of the newest intact checkpoint in `directory` as saved
  (`restore_saved`), or None where the directory holds none.

  Raises:
    UnreadableCheckpointError: if it holds steps but none can be read.
  """
  if not os.path.isdir(directory):
    return None
  with Checkpoints(directory, max_to_keep=None) as store:  # None: a reader deletes nothing
    if store.latest_step() is None:
      return None
    return store.restore_saved()


def _abstract_leaf(leaf: Any) -> Any:
  # jax.Arrays become ShapeDtypeStructs carrying their sharding, so the restore places each
  # shard where the template's does; a ShapeDtypeStruct without one would let Orbax fall back
  # to the saved layout, which fails on any other, so it is replicated over the current mesh.
  # Host arrays and Python scalars serve as their own templates.
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=mesh.replicated())
  return leaf


def _saved_leaf_target(leaf: Any) -> Any:
  """The restore target of one leaf of Orbax's metadata tree, on the current layout."""
  if isinstance(leaf, ocp.metadata.ScalarMetadata):  # a Python scalar when saved
    return np.dtype(leaf.dtype).type(0).item()
  if isinstance(leaf, ocp.metadata.ArrayMetadata):
    if leaf.sharding is None:  # a host (numpy) array when saved
      return np.zeros(leaf.shape, leaf.dtype)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=mesh.replicated())
  return leaf


def _cause(error: BaseException, step_dir: str) -> str:
  """One short line of why a step could not be read: the damaged file (relative to the step)
  and the innermost cause, without tensorstore's spec or quote characters."""
  text = " ".join(str(error).split("[tensorstore_spec=")[0].split()) or type(error).__name__
  files = re.findall(r'local file "([^"]+)"', text)
  innermost = text.rsplit(": ", 1)[-1].replace(step_dir + os.sep, "")
  if files:
    cause = f"{os.path.relpath(files[-1], step_dir)}: {innermost}"
  elif isinstance(error, OSError) and getattr(error, "filename", None):
    cause = f"{os.path.relpath(os.fspath(error.filename), step_dir)}: {error.strerror}"
  else:
    cause = text
  return _clip(cause.replace('"', "").replace("'", ""), _REASON_CHARS)


def _clip(text: str, limit: int) -> str:
  return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


class _StepMetadataFilter(logging.Filter):
  """Drops Orbax's error about a damaged `_CHECKPOINT_METADATA` of a step: it quotes the whole
  damaged file on one line (thousands of characters of garbage), twice, about a file this
  module never needs; the items it reads are checked when read."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to json parse Metadata file")


logging.getLogger("absl").addFilter(_StepMetadataFilter())

def _quiet_abandoned_reads() -> None:
  """Keeps a failed read's leftovers off stderr, where one line per problem is the rule.

  When one read of a damaged step fails, Orbax's event loop closes while tensorstore still
  completes the step's other reads: each completion raises "Event loop is closed" into
  `sys.unraisablehook` (a traceback on stderr, possibly after the run's error line), and
  asyncio logs every abandoned task of Orbax as "exception was never retrieved" with its
  traceback, some as the failing call unwinds. Both are dropped: installed before any read,
  as the second comes before the failure reaches this module. Other unraisable exceptions and
  asyncio records go through.
  """
  if sys.unraisablehook is not _drop_closed_loop_callbacks:  # pytest, say, swaps the hook
    _drop_closed_loop_callbacks.previous = sys.unraisablehook
    sys.unraisablehook = _drop_closed_loop_callbacks
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedOrbaxTaskFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedOrbaxTaskFilter())


def _drop_closed_loop_callbacks(unraisable) -> None:
  value = unraisable.exc_value
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return
  _drop_closed_loop_callbacks.previous(unraisable)


_drop_closed_loop_callbacks.previous = sys.unraisablehook


class _AbandonedOrbaxTaskFilter(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records of Orbax's tasks: those raised in
  Orbax's code, or by the tensorstore reads it awaits (whose errors quote their spec)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in str(record.msg) or not record.exc_info:
      return True
    if "tensorstore_spec=" in str(record.exc_info[1]):
      return False
    tb = record.exc_info[2]
    while tb is not None:
      if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
        return False
      tb = tb.tb_next
    return True


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
