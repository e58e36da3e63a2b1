"""What a stage writes so that a user can look rather than read: metrics, curves and progress.

Each stage writes its scalars twice: as JSON lines in `<dir>/metrics.jsonl` (one object per
line, `{"step": .., "time": .., **scalars}`; easy to load in a notebook, and what
`plot_curves` draws into a PNG at the end of a stage) and as TensorBoard event files in
`<dir>/tensorboard/` (written by tensorboardX, so TensorFlow is never imported), for watching a
run live with `tensorboard --logdir WORKDIR`.

A run killed after logging past its last checkpoint logs those steps again when it resumes;
`MetricWriter(..., resume_step=step)` drops the JSON lines after the restored step, and tells
TensorBoard to hide the events after it, so neither shows a step twice.

`Progress` is a tqdm bar with rate and ETA on a terminal; in a log file (a batch job, where a
bar would print one line per refresh) it logs one line every `log_every_s` seconds instead.
`close_progress_bars` ends every bar still open, so that an error printed after a stage
stopped mid-loop starts on a line of its own (`errors.report`).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

_RESERVED = ("step", "time")

# The Progress bars not closed yet; weak, so that a bar dropped without close() goes too.
_OPEN_BARS: weakref.WeakSet = weakref.WeakSet()


class MetricWriter:
  """JSON lines (<dir>/metrics.jsonl) and TensorBoard event files (<dir>/tensorboard/).

  Example:
    with MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=step) as w:
      w.write(step, {"loss": loss, "learning_rate": lr})
  """

  def __init__(self, directory: str, enabled: bool = True, resume_step: int | None = None):
    """Opens the writer, appending to what a previous run of the stage wrote.

    Args:
      directory: the stage's output directory; created if missing.
      enabled: False on all processes but one, where the writer does nothing.
      resume_step: the step the run resumes from: existing lines with a larger step are
        dropped (they are about to be logged again). None keeps every existing line.
    """
    self.enabled = enabled
    self.path = os.path.join(directory, "metrics.jsonl")
    if not enabled:
      return
    os.makedirs(directory, exist_ok=True)
    _truncate(self.path, resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    # purge_step hides the events a killed run wrote past its checkpoint, as truncation does
    # for the JSON lines.
    self._tensorboard = _summary_writer_class()(
        logdir=os.path.join(directory, "tensorboard"),
        purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Writes one JSON line and one TensorBoard scalar per entry, then flushes both.

    Args:
      step: the training step the scalars belong to.
      scalars: name -> number (Python, NumPy or JAX scalar; stored as a Python float).
    """
    if not self.enabled:
      return
    clash = [k for k in scalars if k in _RESERVED]
    if clash:
      raise ValueError(f"metric names {clash} are reserved for the record itself")
    record = {"step": int(step), "time": time.time()}
    record.update({k: float(v) for k, v in scalars.items()})
    # One write call per line, so a kill leaves at most one partial last line, which
    # read_jsonl ignores.
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, record[name], global_step=record["step"],
                                   walltime=record["time"])
    self._tensorboard.flush()

  def close(self) -> None:
    if not self.enabled or self._file.closed:
      return
    self._file.close()
    self._tensorboard.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch whenever it is installed (here it is, for importing the original
  weights) merely to accept torch tensors. Loading PyTorch's CUDA libraries into a JAX process
  costs seconds and memory and can clash with JAX's own CUDA libraries, so the import is
  hidden from it; scalars here are Python floats.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file, in order; [] if it does not exist.

  A partial last line (a write cut short by a kill) is ignored; a malformed line elsewhere
  raises ValueError.
  """
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: the write was cut short
        logging.warning("ignoring the partial last line of %s", path)
        continue
      raise ValueError(f"{path}:{number} is not a JSON object ({e}); delete or fix that "
                       "line") from None
  return records


def _truncate(path: str, resume_step: int | None) -> None:
  """Drops the records after `resume_step` and any partial last line, atomically."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    text = f.read()
  records = read_jsonl(path)
  kept = [r for r in records if resume_step is None or r.get("step", 0) <= resume_step]
  if len(kept) == len(records) and (not text or text.endswith("\n")):
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)  # a kill now leaves either the old file or the new one


def plot_curves(records: Sequence[dict], keys: Iterable[str], path: str, title: str = "",
                xlabel: str = "step", logy_keys: Iterable[str] = ()) -> str | None:
  """Draws one subplot per metric against the step into one PNG.

  Args:
    records: dicts with a "step" and some of `keys` (as read_jsonl returns them).
    keys: the metrics to draw, in order; those with no finite value in `records` are skipped.
    path: the PNG to write (its directory must exist).
    title: the figure's title.
    xlabel: the x axis' label.
    logy_keys: metrics drawn on a log scale (where all their values are positive).

  Returns:
    `path`, or None (and nothing written) if no key has data.
  """
  # Figure without pyplot: no global backend or figure registry, so this is safe to call from
  # any thread and never opens a window.
  from matplotlib.figure import Figure

  curves = {}
  for key in keys:
    points = sorted((r["step"], float(r[key])) for r in records
                    if "step" in r and isinstance(r.get(key), (int, float))
                    and math.isfinite(r[key]))
    if points:
      curves[key] = points
  if not curves:
    return None
  columns = min(3, len(curves))
  rows = -(-len(curves) // columns)
  fig = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  logy = set(logy_keys)
  for ax, (key, points) in zip(axes, curves.items()):
    steps, values = zip(*points)
    ax.plot(steps, values, marker="." if len(points) < 50 else None)
    if key in logy and min(values) > 0:
      ax.set_yscale("log")
    ax.set_title(key)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  for ax in axes[len(curves):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)
  fig.savefig(path, format="png", dpi=100)
  return path


class Progress:
  """A progress bar (tqdm) with rate and ETA, or log lines where stderr is not a terminal.

  In a log the line reads '<desc>: i/total (x%), r <unit>/s, ETA hh:mm:ss, k=v, ...', once
  every `log_every_s` seconds and once more when closed. The rate counts only this run's
  steps (not `initial`), so a resumed run's ETA is right.

  Example:
    with Progress(total, "train", initial=step) as bar:
      ...
      bar.update(1, loss=0.123)
  """

  def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step",
               enabled: bool = True, log_every_s: float = 30.0):
    """Starts the bar (or the clock of the log lines).

    Args:
      total: the count at completion.
      desc: the label.
      initial: the count already done (e.g. the step a run resumes from).
      unit: what is counted, for the rate.
      enabled: False shows and logs nothing (e.g. on all processes but one).
      log_every_s: seconds between log lines when stderr is not a terminal.
    """
    self.total, self.desc, self.unit = total, desc, unit
    self.enabled, self.log_every_s = enabled, log_every_s
    self.n = self._initial = self._logged_n = initial
    self._postfix: dict[str, Any] = {}
    self._start = self._last_log = time.monotonic()
    self._bar = None
    if enabled and _is_terminal(sys.stderr):
      import tqdm
      self._bar = tqdm.tqdm(total=total, desc=desc, initial=initial, unit=unit,
                            dynamic_ncols=True, mininterval=0.5)
    if enabled:
      _OPEN_BARS.add(self)

  def update(self, n: int = 1, **postfix) -> None:
    """Advances by `n` (0 only updates the postfix); postfix values are shown as k=v."""
    if not self.enabled:
      return
    self.n += n
    self._postfix.update(postfix)
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: _format(v) for k, v in self._postfix.items()},
                              refresh=False)
      self._bar.update(n)
    elif time.monotonic() - self._last_log >= self.log_every_s:
      self._log()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self.n != self._logged_n:
      self._log()
    self.enabled = False
    _OPEN_BARS.discard(self)

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _log(self) -> None:
    now = time.monotonic()
    self._last_log, self._logged_n = now, self.n
    elapsed = now - self._start
    done = self.n - self._initial
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = _hms((self.total - self.n) / rate) if rate > 0 else "?"
    percent = 100.0 * self.n / self.total if self.total else 100.0
    parts = [f"{self.desc}: {self.n}/{self.total} ({percent:.0f}%)",
             f"{rate:.3g} {self.unit}/s", f"ETA {eta}"]
    parts += [f"{k}={_format(v)}" for k, v in self._postfix.items()]
    logging.info(", ".join(parts))


def close_progress_bars() -> None:
  """Closes every progress bar still open: this module's and any other tqdm bar (TFDS's).

  Each ends with its last state and a newline (tqdm's `leave`), so that what is printed next,
  such as an error, starts on a line of its own rather than after the bar's carriage return.
  """
  for bar in list(_OPEN_BARS):  # their tqdm bars leave their line (tqdm's default)
    bar.close()
  tqdm = sys.modules.get("tqdm")  # tqdm's own registry of open bars (not imported: none)
  instances = getattr(getattr(tqdm, "tqdm", None), "_instances", None) if tqdm else None
  for bar in list(instances or ()):
    bar.leave = True
    bar.close()


def summarize(values: np.ndarray) -> dict[str, float]:
  """mean, the 95% half-width 1.96 std / sqrt(n) (population std), and n."""
  values = np.asarray(values, np.float64)
  n = len(values)
  return {"mean": float(values.mean()), "ci95": float(1.96 * values.std() / np.sqrt(n)),
          "n": n}


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # replaced or closed streams
    return False


def _format(value: Any) -> str:
  if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
    return f"{value:.4g}"
  return str(value)


def _hms(seconds: float) -> str:
  seconds = int(round(max(seconds, 0.0)))
  return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
