"""The workdir: its layout, the readers of what the stages wrote, and the guards of a run.

A workdir holds one run (docs/WORKDIR.md):

    WORKDIR/config.json            the config that made the outputs
    WORKDIR/pretrain/              backbone pretraining: checkpoints/, best/, metrics, curves.png
    WORKDIR/features/              the feature cache (one .npz per split and backbone)
    WORKDIR/prototypes/            targets.npz: the diffusion targets w0 of the base classes
    WORKDIR/train_<K>shot/         diffusion training for K shots: checkpoints/, best/, ...
    WORKDIR/eval/                  per-shot results
    WORKDIR/results.json, results.md   the accuracy table of the eval stage

The layout (`stage_dir`, `train_dir`, `targets_path`, `shots_in`) and the writers every stage
uses (`prepare_workdir`, `write_json`, `cached_result`) come first; then the readers of what
earlier stages wrote (`pretrained_backbone`, `pretrained_features`, `load_targets`,
`diffusion_targets`, `kept_steps`, `load_denoiser`), each raising a `StageError` that names
the stage to run when it is missing.

The guards: three things can go wrong between a config and a workdir before any work is done,
and each is caught here, in one line, with nothing written:

1. The record (`record_conflicts`, `check_record`): WORKDIR/config.json says how the outputs
   already in the workdir were made. A config that differs from it in a field that affects a
   stage whose outputs exist would mix two configs in one run, or leave a config.json that
   claims the old outputs were made with the new values; the run is refused, naming the fields
   and the folders to move away. Changes that cannot make the record lie are allowed: more
   steps for a stage that continues from its checkpoint (`CONTINUED`), settings of a stage
   that recomputes its results when they change (`RECOMPUTED`, e.g. the eval stage, whose
   results are keyed on their settings), fields of stages with no outputs yet, and fields that
   change no result (`NO_EFFECT`: logging, checkpoint cadence, batch sizes of pure inference).
2. The lock (`Lock`): two runs on one workdir would write the same files. The first holds an
   exclusive `fcntl.flock` on WORKDIR/.lock for the whole run; the second stops at once,
   naming the holder. The kernel drops the lock when its process ends, however it ends
   (SIGKILL included), so a killed run never leaves a lock that blocks.
3. The episodes (`check_episodes`): every split that a configured stage draws episodes from
   is checked against the dataset's class count (its metadata) and per-class image counts, so
   that an impossible setting (more ways than classes, a class smaller than shots + queries)
   stops the run before hours of pretraining, not at the eval stage.

`guard(config, workdir)` runs the three on process 0 of a run (the only writer; the other
processes of the same run share its lock) and tells the others whether to go on.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from metadiff_jax import checkpoint, config_lib, embedding, mesh, method, pretraining
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.data import features
from metadiff_jax.data.errors import DataError
from metadiff_jax.errors import ConfigError, StageError, UserError

LOCK_FILE = ".lock"
TARGETS_FILE = "targets.npz"

# The stages in the order they build on each other: a field of one stage changes the outputs
# of that stage and of every stage after it in its chain (`_DOWNSTREAM`).
_DOWNSTREAM = {
    "pretrain": ("prototypes", "train", "eval", "analysis", "stability"),
    "prototypes": ("train", "eval", "analysis", "stability"),
    "train": ("eval", "analysis", "stability"),
    "eval": (),
    "analysis": (),
    "stability": (),
}
# Fields that change no result: where files are, how often progress is logged and
# checkpoints saved, and how many images or episodes one compiled call handles in inference
# (the same numbers either way). Not so the training calls' steps_per_call: validation runs
# after a call, so it moves the steps that are validated. `data.data_dir` says where the
# dataset is, not which one: data.name and data.builder_config name it. `train.shots` picks
# which denoisers train, each in its own train_<K>shot folder that no other shot changes.
NO_EFFECT = frozenset({
    "stages", "train.shots", "data.data_dir", "data.device_memory_fraction",
    "pretrain.log_every_steps", "pretrain.checkpoint_every_steps", "pretrain.embed_batch_size",
    "train.log_every_steps", "train.checkpoint_every_steps", "eval.batch_episodes",
    "analysis.batch_episodes", "analysis.log_every_steps",
})
# Sampling settings: the eval stage's results are keyed on them (`method.sampler_settings`),
# so a change re-evaluates the trained denoiser. The train stage's validation sampled with the
# values it ran with (its metrics.jsonl); config.json then holds the eval stage's.
_SAMPLER_FIELDS = ("diffusion.num_sampling_steps", "diffusion.sampler_dtype",
                   "diffusion.sampler_precision", "diffusion.sampler")
# Fields a stage continues with when they are raised: it resumes from its checkpoint and
# trains on, as an uninterrupted run with the larger value would have (docs/WORKDIR.md,
# "More steps").
CONTINUED = {"pretrain.epochs": "pretrain", "train.steps": "train"}
# Stages that key their results on their own settings and recompute them when those change
# (the eval stage's per-shot results; the analysis and stability rows, `cached_result`).
RECOMPUTED = frozenset({"eval", "analysis", "stability"})
# Stages whose outputs record the outputs they were made from (the feature key of the
# targets, the denoiser fingerprint of the eval results) and are redone when those change.
_INPUT_CHECKED = frozenset({"prototypes", "eval"})


def home_stage(field: str) -> str | None:
  """The first stage whose outputs `field` ("section.name") changes, or None for none.

  data, backbone, pretrain and seed: pretrain (and so every stage after it); prototypes:
  prototypes; denoiser, diffusion and train: train; eval and the sampler settings: eval;
  analysis, stability: those. A section no rule names counts as pretrain (the safe guess).
  """
  if field in NO_EFFECT:
    return None
  if field in _SAMPLER_FIELDS:
    return "eval"
  section = field.split(".", 1)[0]
  return {"seed": "pretrain", "data": "pretrain", "backbone": "pretrain",
          "pretrain": "pretrain", "prototypes": "prototypes", "diffusion": "train",
          "denoiser": "train", "train": "train", "eval": "eval", "analysis": "analysis",
          "stability": "stability"}.get(section, "pretrain")


# ----------------------------------------------------------------------------- the layout

def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(os.path.expanduser(workdir), name)


def backbone_dir(workdir: str) -> str:
  """WORKDIR/pretrain/best: the pretrained (or imported) backbone that later stages read."""
  return os.path.join(stage_dir(workdir, "pretrain"), "best")


def train_dir(workdir: str, shots: int) -> str:
  """WORKDIR/train_<K>shot: the K-shot denoiser's checkpoints, best/, metrics and curves."""
  return stage_dir(workdir, f"train_{shots}shot")


def shots_in(workdir: str) -> list[int]:
  """K of every train_<K>shot folder in the workdir, sorted (none if it does not exist)."""
  directory = os.path.expanduser(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name[6:-4]) for name in os.listdir(directory)
                if name.startswith("train_") and name.endswith("shot") and name[6:-4].isdigit())


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir and checks that it can be written; returns its absolute path."""
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise StageError(f"cannot write to workdir {path} ({e.strerror or e}); choose a writable "
                     "--workdir") from None
  return path


def write_json(path: str, obj) -> None:
  """Writes JSON atomically (a killed run leaves the previous file, not half of a new one)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=json_default)
  os.replace(tmp, path)


def cached_result(path: str, settings: dict, compute, what: str) -> dict:
  """The result JSON at `path` if it was written with these `settings`, else
  {"settings": settings, **compute()}, written there (by the writer process).

  `settings` are compared as JSON would store them (tuples as lists), so a result written
  by an earlier run is found again. `what` names it in the log line of a reuse.
  """
  settings = json.loads(json.dumps(settings, default=json_default))
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous.get("settings") == settings:
      logging.info("%s: result already in %s; skipping", what, path)
      return previous
  result = {"settings": settings, **compute()}
  if mesh.is_writer():
    write_json(path, result)
  return result


# ----------------------------------------------------------------------------- the record

def stage_outputs(root: str) -> dict[str, list[str]]:
  """{stage: the names in `root` that hold its outputs}, for the stages that have some.

  A folder counts when it holds any file (an interrupted stage's checkpoints too); the
  feature cache (features/) counts for none: its entries are keyed on the backbone and the
  dataset, so no config can reuse a wrong one.
  """
  def has_files(name):
    for _, _, files in os.walk(os.path.join(root, name)):
      if files:
        return True
    return False

  names = sorted(os.listdir(root)) if os.path.isdir(root) else []
  found = {
      "pretrain": [n for n in names if n == "pretrain" and has_files(n)],
      "prototypes": [n for n in names if n == "prototypes" and has_files(n)],
      "train": [n for n in names if n.startswith("train_") and n.endswith("shot")
                and has_files(n)],
      "eval": [n for n in names if (n == "eval" and has_files(n))
               or n in ("results.json", "results.md")],
      "analysis": [n for n in names if n == "analysis" and has_files(n)],
      "stability": [n for n in names if n == "stability" and has_files(n)],
  }
  return {stage: found_names for stage, found_names in found.items() if found_names}


def flatten(values: dict, prefix: str = "") -> dict:
  """{"section.name": value} of a nested config dict, as JSON stores it (tuples as lists)."""
  out = {}
  for name, value in values.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{name}."))
    else:
      out[f"{prefix}{name}"] = value
  return out


def json_default(x):
  """JSON for the numpy scalars, arrays and tuples the workdir's records hold."""
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, (tuple, np.ndarray)):
    return list(x)
  raise TypeError(f"not JSON-serialisable: {type(x)}")


def as_json(config) -> dict:
  """The config as config.json stores it."""
  return json.loads(json.dumps(config.to_dict(), default=json_default))


def record_conflicts(old: dict, new: dict, existing: dict[str, list[str]],
                     running) -> list[tuple[str, object, object, list[str]]]:
  """The changed fields that would make the record lie, with the outputs they concern.

  Args:
    old: the recorded config (config.json), nested or flat.
    new: the config of this run, likewise.
    existing: `stage_outputs` of the workdir.
    running: the stages this run runs.

  Returns:
    [(field, old value, new value, [stages whose existing outputs it affects])], empty when
    the run may go on. A field present on one side only (a config written by another version
    of the package) is not compared.
  """
  old, new, running = flatten(old), flatten(new), set(running)
  conflicts = []
  for field in sorted(set(old) & set(new)):
    before, after = old[field], new[field]
    if before == after:
      continue
    home = home_stage(field)
    if home is None:
      continue
    if field in CONTINUED and home in running and _raised(before, after):
      # The stage itself trains on; a later stage's outputs are stale unless they record
      # the outputs they were made from.
      hit = [s for s in _DOWNSTREAM[home] if s in existing and s not in _INPUT_CHECKED]
    elif home in RECOMPUTED and home in running:
      hit = [s for s in _DOWNSTREAM[home] if s in existing and s not in _INPUT_CHECKED]
    else:
      hit = [s for s in (home, *_DOWNSTREAM[home]) if s in existing]
    if hit:
      conflicts.append((field, before, after, hit))
  return conflicts


def _raised(before, after) -> bool:
  return (isinstance(before, (int, float)) and isinstance(after, (int, float))
          and not isinstance(before, bool) and after > before)


def read_record(root: str) -> dict | None:
  """The recorded config of the workdir (config.json), or None if it has none.

  Raises:
    ConfigError: if config.json exists but cannot be read.
  """
  path = os.path.join(root, config_lib.WORKDIR_CONFIG)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      values = json.load(f)
    if not isinstance(values, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read {path} ({e}), the record of how this workdir's outputs "
                      "were made; restore it, or use a new --workdir") from None
  return values


def check_record(config, root: str) -> None:
  """Refuses a config that differs from the workdir's record where it would make it lie.

  Raises:
    ConfigError: naming the fields (old -> new) and the outputs to move away.
  """
  # The outputs first, then the record: a run writes its record before any output.
  existing = stage_outputs(root)
  old = read_record(root)
  if old is None:
    if existing:
      logging.warning("workdir %s holds outputs (%s) but no %s; nothing to compare the "
                      "config with", root, ", ".join(sum(existing.values(), [])),
                      config_lib.WORKDIR_CONFIG)
    return
  conflicts = record_conflicts(old, as_json(config), existing, config_lib.stages_of(config))
  if not conflicts:
    return
  fields = ", ".join(f"{field} {_show(a)} -> {_show(b)}" for field, a, b, _ in conflicts)
  stages = sorted({s for *_, hit in conflicts for s in hit}, key=list(_DOWNSTREAM).index)
  paths = [name for s in stages for name in existing[s]]
  running = config_lib.stages_of(config)
  continued = [f for f, a, b, _ in conflicts
               if f in CONTINUED and _raised(a, b) and CONTINUED[f] not in running]
  hint = ""
  if continued:
    hint = (f" ({', '.join(continued)} continues only in a run whose config.stages includes "
            f"{', '.join(sorted({CONTINUED[f] for f in continued}))})")
  raise ConfigError(
      f"the config differs from {os.path.join(root, config_lib.WORKDIR_CONFIG)}, which made "
      f"the outputs in this workdir, in {fields}; that changes what the existing "
      f"{', '.join(paths)} would hold{hint}; use a new --workdir, or move {', '.join(paths)} "
      f"out of {root} so that {'that stage runs' if len(stages) == 1 else 'those stages run'}"
      " again")


def _show(value) -> str:
  if isinstance(value, list):
    value = tuple(value)
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------- the lock

class Lock:
  """An exclusive lock on a workdir: `fcntl.flock` on WORKDIR/.lock, held until `release`.

  The file holds the holder's host, pid and start time while it is held, for the message of
  a refused run; the lock itself is the kernel's, so it ends with the process that holds it.
  """

  def __init__(self, root: str):
    self.path = os.path.join(root, LOCK_FILE)
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock, or raises a StageError naming the run that holds it."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise StageError(f"cannot open the workdir's lock file {self.path} ({e.strerror or e}); "
                       "remove whatever is in its place, or choose another --workdir") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        holder = _holder(fd)
        os.close(fd)
        raise StageError(f"another run is using the workdir {os.path.dirname(self.path)} "
                         f"({holder}); wait for it to end, or give this run another "
                         "--workdir") from None
      # A file system without flock (some network mounts): go on unguarded, and say so.
      os.close(fd)
      logging.warning("cannot lock %s (%s); nothing stops a second run on this workdir",
                      self.path, e.strerror or e)
      return
    self._fd = fd
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since})
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # an unheld lock names no holder
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _holder(fd: int) -> str:
  """'host H, pid P, since T' of the lock file's holder, as far as the file says."""
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"held by host {info['host']}, pid {info['pid']}, since {info['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "its holder has not written its name yet"


# ----------------------------------------------------------------------------- the episodes

def episode_settings(config) -> list[tuple]:
  """What each configured stage draws: [(what, split, ways field, ways, shots field, shots,
  queries field, queries)], fields named as in the config (None: no queries)."""
  stages = config_lib.stages_of(config)
  t, e, p = config.train, config.eval, config.pretrain
  eval_field = "eval.shots" if e.shots else "train.shots"
  out = []
  if "pretrain" in stages and not config.backbone.checkpoint and p.epochs > 0:
    out.append(("the pretrain stage's validation episodes", "val", "pretrain.val_ways",
                p.val_ways, "pretrain.val_shots", p.val_shots, "pretrain.val_queries",
                p.val_queries))

  def trained(shots, field, who):
    for k in shots:
      out.append((f"{who} training episodes", "train", "train.ways", t.ways, field, k, None,
                  0))
      out.append((f"{who} validation episodes", "val", "train.ways", t.ways, field, k,
                  "train.val_queries", t.val_queries))

  def tested(shots, field, who):
    for k in shots:
      out.append((f"{who} test episodes", "test", "eval.ways", e.ways, field, k,
                  "eval.queries", e.queries))

  if "train" in stages and config.denoiser.unet:
    trained(t.shots, "train.shots", "the train stage's")
  if "eval" in stages:
    tested(config_lib.eval_shots(config), eval_field, "the eval stage's")
  for name in ("analysis", "stability"):
    if name in stages:
      own = config[name].shots
      shots = tuple(own) if own else config_lib.eval_shots(config)
      field = f"{name}.shots" if own else eval_field
      tested(shots, field, f"the {name} stage's")
      trained(shots, field, f"the {name} stage's")
      if name == "analysis":
        for k in shots:
          out.append(("the analysis stage's validation and meta-training episodes", "val",
                      "eval.ways", e.ways, field, k, "eval.queries", e.queries))
          out.append(("the analysis stage's meta-training episodes", "train", "eval.ways",
                      e.ways, field, k, "analysis.queries", config.analysis.queries))
  return out


def check_episodes(config) -> None:
  """Checks every episode setting of the configured stages against the dataset.

  Class counts come from the dataset's metadata; per-class image counts from the split's
  labels, read without decoding its images (`load.split_labels`).

  Raises:
    DataError: naming the setting, the split and the fix.
  """
  from metadiff_jax.data import load  # pylint: disable=g-import-not-at-top  (tensorflow-datasets)
  settings = episode_settings(config)
  if not settings:
    return
  ref = embedding.dataset_ref(config)
  dataset = config.data.name if not config.data.builder_config else \
      f"{config.data.name} ({config.data.builder_config})"
  names = {}
  for _, split, ways_field, ways, *_ in settings:
    if split not in names:
      names[split] = load.class_names(ref, split)
    if ways > len(names[split]):
      raise DataError(f"config.{ways_field} = {ways} but the {split} split of {dataset} has "
                      f"{len(names[split])} classes; lower config.{ways_field} to at most "
                      f"{len(names[split])}")
  counts = {}
  for what, split, ways_field, ways, shots_field, shots, queries_field, queries in settings:
    if split not in counts:
      labels = load.split_labels(ref, split)
      counts[split] = np.bincount(labels, minlength=len(names[split]))
    table = episodes_lib.ClassTable(members=None, counts=counts[split])
    try:
      episodes_lib.check_support_episodes(table, ways, int(shots) + int(queries), split)
    except DataError:
      smallest = int(counts[split].min())
      label = int(np.argmin(counts[split]))
      need = f"{shots} shot{'s' * (shots != 1)} of config.{shots_field}"
      if queries_field:
        need += f" + {queries} quer{'ies' if queries != 1 else 'y'} of config.{queries_field}"
      fix = "lower them to at most" if queries_field else "lower it to at most"
      raise DataError(f"{what} need {int(shots) + int(queries)} images per class ({need}) "
                      f"but class {names[split][label]!r} of the {split} split of {dataset} "
                      f"has {smallest}; {fix} {smallest}") from None


# ----------------------------------------------------------------------------- all three

@contextlib.contextmanager
def guard(config, root: str):
  """Holds the workdir's lock and checks the record and the episodes, for one run.

  Process 0 takes the lock and runs the checks; the other processes of the run wait for its
  verdict and stop with it (they share its lock: one run, one workdir). Nothing is written
  before the checks pass.

  Raises:
    UserError: the lock is held by another run, or a check failed.
  """
  lock = Lock(root) if mesh.is_writer() else None
  error = None
  try:
    if lock is not None:
      lock.acquire()
      check_record(config, root)
      check_episodes(config)
  except UserError as e:
    error = e
  except Exception:
    _verdict(False)
    raise
  if not _verdict(error is None):
    if lock is not None:
      lock.release()
    if error is not None:
      raise error
    raise StageError("process 0 stopped this run before its first stage; its error line says "
                     "why")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _verdict(ok: bool) -> bool:
  """Process 0's `ok`, on every process of the run."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


# ----------------------------------------------------------------------------- the readers

def pretrained_backbone(config, workdir: str):
  """(module, variables) of the pretrained backbone that the pretrain stage kept.

  Raises:
    StageError: if there is none (run the pretrain stage), or it does not fit the config.
  """
  directory = backbone_dir(workdir)
  store = checkpoint.Checkpoints(directory, max_to_keep=1)
  try:
    if store.latest_step() is None:
      raise StageError(f"no pretrained backbone in {directory}; run the pretrain stage first "
                       "(--config.stages=\"('pretrain',)\"), or set config.backbone.checkpoint")
    state, _ = checkpoint.restore_or_raise(
        store, pretraining.initial_state(config),
        mismatch=lambda e: StageError(
            f"the pretrained backbone in {directory} does not fit the configured backbone: "
            f"{e.detail}; use the config it was trained with, or a new workdir"),
        unreadable=lambda e: StageError(
            f"the pretrained backbone in {directory} cannot be read: {e.detail}; move "
            f"{stage_dir(workdir, 'pretrain')} aside and rerun the pretrain stage (nothing is "
            "deleted)"))
  finally:
    store.close()
  return embedding.backbone(config), pretraining.backbone_variables(state)


def pretrained_features(config, workdir: str, split: str,
                        progress: bool = True) -> features.FeatureSet:
  """The cached features of `split` under the pretrained backbone (`pretrained_backbone`)."""
  return pretrained_splits(config, workdir, (split,), progress)[0]


def pretrained_splits(config, workdir: str, splits: Sequence[str],
                      progress: bool = True) -> tuple[features.FeatureSet, ...]:
  """The cached features of each of `splits`, the pretrained backbone restored once."""
  module, variables = pretrained_backbone(config, workdir)
  return tuple(embedding.split_features(config, workdir, split, module, variables,
                                        progress=progress) for split in splits)


def targets_path(workdir: str) -> str:
  """WORKDIR/prototypes/targets.npz: the base classes' diffusion targets and the fingerprints
  of the features they came from."""
  return os.path.join(stage_dir(workdir, "prototypes"), TARGETS_FILE)


def _require_targets(workdir: str) -> str:
  """The targets' path, or a StageError naming the stage that writes them."""
  path = targets_path(workdir)
  if not os.path.exists(path):
    raise StageError(f"no diffusion targets in {path}; run the prototypes stage first "
                     "(--config.stages=\"('prototypes', 'train')\")")
  return path


def load_targets(workdir: str, feature_set: features.FeatureSet) -> np.ndarray:
  """[C, D] targets written for these base features, or a StageError naming the stage to run."""
  path = _require_targets(workdir)
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
  (`embedding.diffusion_features`): the prototypes stage's file, or, for rescaled features,
  their class means (computed here: a pass over the cache)."""
  if config.diffusion.feature_rms is None:
    return load_targets(workdir, base)
  _require_targets(workdir)  # the stage that caches the features
  return np.asarray(features.class_means(base.features, base.labels, base.num_classes))


def kept_steps(workdir: str, shots: int) -> dict[str, list[int]]:
  """The steps of the K-shot denoiser kept in train_<K>shot: {"best": [...] (its
  best-validated one), "checkpoints": [...] (the latest few)}, ascending; none where a folder
  is missing."""
  run_dir = train_dir(workdir, shots)
  out = {}
  for name in ("best", "checkpoints"):
    directory = os.path.join(run_dir, name)
    out[name] = []
    if os.path.isdir(directory):  # not opened otherwise: opening creates the folder
      with checkpoint.Checkpoints(directory, max_to_keep=None) as store:
        out[name] = store.all_steps()
  return out


def _checkpoint_location(workdir: str, shots: int, which) -> tuple[str, int | None]:
  """(folder, step) of the checkpoint that `which` ("best", "last" or a step) names; step
  None: the folder's latest. A StageError if there is none, a ConfigError for a step that
  is not kept."""
  run_dir = train_dir(workdir, shots)
  steps = kept_steps(workdir, shots)
  if which in ("best", "last"):
    folder = "best" if which == "best" else "checkpoints"
    if which == "last" and not steps[folder] and steps["best"]:
      raise ConfigError(f"config.eval.checkpoint = 'last': {run_dir} keeps no training "
                        f"checkpoints, only best/ (step {steps['best'][-1]}; an imported "
                        "denoiser, or its checkpoints/ were removed); evaluate it with "
                        "config.eval.checkpoint = 'best'")
    if not steps[folder]:
      raise StageError(f"no trained {shots}-shot denoiser in {run_dir}/{folder}; run the train "
                       f"stage first (--config.stages=\"('train', 'eval')\") with "
                       f"config.train.shots including {shots}")
    return os.path.join(run_dir, folder), None
  for folder in ("checkpoints", "best"):
    if which in steps[folder]:
      return os.path.join(run_dir, folder), which
  if not steps["checkpoints"] and not steps["best"]:
    raise StageError(f"config.eval.checkpoint = {which}: {run_dir} holds no trained {shots}-shot "
                     "denoiser; run the train stage first (--config.stages=\"('train', 'eval')\")")
  kept = ", ".join(str(s) for s in steps["checkpoints"]) or "none"
  best = ", ".join(str(s) for s in steps["best"]) or "none"
  raise ConfigError(f"config.eval.checkpoint = {which}: no {shots}-shot checkpoint of step "
                    f"{which} in {run_dir}; it keeps steps {kept} in checkpoints/ and {best} in "
                    "best/: set config.eval.checkpoint to one of them, 'best' or 'last'")


def load_denoiser(config, workdir: str, shots: int, feature_dim: int, which="best"):
  """(method, trained state, state at initialisation, checkpoint metadata) of the K-shot
  denoiser, or a UserError naming what to do; the method is `method.MetaDiff.from_config`.

  Args:
    which: "best" (kept in train_<K>shot/best), "last" (the latest in train_<K>shot/checkpoints)
      or a step kept in either (config_lib.eval_checkpoint).

  Without the UNet (config.denoiser.unet = False) the denoiser has no parameters: no
  checkpoint is read, both states are the empty initial one and the metadata is {}.
  """
  metadiff = method.MetaDiff.from_config(config, feature_dim)
  init_state = metadiff.init(shots)
  if not config.denoiser.unet:
    return metadiff, init_state, init_state, {}
  state, meta = restore_denoiser(workdir, shots, init_state, which)
  return metadiff, state, init_state, meta


def restore_denoiser(workdir: str, shots: int, init_state, which="best"):
  """(trained state, checkpoint metadata) of the K-shot denoiser `which` (as `load_denoiser`),
  restored into the template `init_state` (`method.MetaDiff.init`), or a UserError naming
  what to do."""
  directory, step = _checkpoint_location(workdir, shots, which)
  store = checkpoint.Checkpoints(directory, max_to_keep=None)  # None: a reader deletes nothing
  try:
    state, meta = checkpoint.restore_or_raise(
        store, init_state, step,
        mismatch=lambda e: StageError(
            f"the {shots}-shot denoiser in {directory} does not fit the config: {e.detail}; "
            "evaluate with the config it was trained with"),
        unreadable=lambda e: StageError(
            f"the {shots}-shot denoiser in {directory} cannot be read: {e.detail}; evaluate "
            f"another one (config.eval.checkpoint) or move {train_dir(workdir, shots)} aside "
            "and retrain it"))
  except UserError:
    raise
  except ValueError as err:
    raise StageError(f"the denoiser in {directory} does not fit the config ("
                     f"{str(err).splitlines()[0]}); evaluate with the config it was "
                     "trained with") from None
  finally:
    store.close()
  # A denoiser that trained to NaN is stopped before it is saved, so non-finite parameters
  # here are a damaged file; sampling with them would report chance as an accuracy.
  bad = sum(int(np.sum(~np.isfinite(np.asarray(leaf))))
            for leaf in jax.tree_util.tree_leaves(state.ema_params))
  if bad:
    raise StageError(f"the {shots}-shot denoiser in {directory}/{int(state.step)} has {bad} NaN "
                     "or infinite parameters (a damaged checkpoint); evaluate another one "
                     "(config.eval.checkpoint = 'best', 'last' or a kept step) or retrain it")
  return state, meta
