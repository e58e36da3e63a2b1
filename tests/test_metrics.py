"""Metric files, curves and progress lines."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import metrics

REPO = pathlib.Path(__file__).parent.parent


def _steps(records):
  return [r["step"] for r in records]


def test_jsonl_round_trip(tmp_path):
  before = time.time()
  with metrics.MetricWriter(str(tmp_path / "run")) as writer:
    writer.write(1, {"loss": jnp.float32(0.5), "accuracy": np.float64(0.25)})
    writer.write(2, {"loss": 0.125, "epoch": 1})
  records = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
  assert [{k: v for k, v in r.items() if k != "time"} for r in records] == [
      {"step": 1, "loss": 0.5, "accuracy": 0.25}, {"step": 2, "loss": 0.125, "epoch": 1.0}]
  assert all(before <= r["time"] <= time.time() for r in records)
  assert all(type(r["loss"]) is float for r in records)
  assert metrics.read_jsonl(str(tmp_path / "absent.jsonl")) == []


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path):
  directory = str(tmp_path)
  with metrics.MetricWriter(directory) as writer:
    for step in (10, 20, 20, 30, 40):
      writer.write(step, {"loss": float(step)})
  # None keeps everything and appends.
  with metrics.MetricWriter(directory) as writer:
    writer.write(50, {"loss": 50.0})
  assert _steps(metrics.read_jsonl(writer.path)) == [10, 20, 20, 30, 40, 50]
  # A run resumed from step 20 logs 30 again.
  with metrics.MetricWriter(directory, resume_step=20) as writer:
    writer.write(30, {"loss": 31.0})
  records = metrics.read_jsonl(writer.path)
  assert _steps(records) == [10, 20, 20, 30] and records[-1]["loss"] == 31.0


def test_a_partial_last_line_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')
  assert _steps(metrics.read_jsonl(str(path))) == [1]
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write(2, {"loss": 2.0})
  assert _steps(metrics.read_jsonl(str(path))) == [1, 2]
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    metrics.read_jsonl(str(path))


def test_disabled_writer_writes_nothing(tmp_path):
  with metrics.MetricWriter(str(tmp_path / "run"), enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
  assert not (tmp_path / "run").exists()


def test_reserved_names_are_refused(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 3.0})


def test_tensorboard_events(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    for step in range(3):
      writer.write(step, {"loss": 1.0 / (step + 1), "accuracy": 0.1 * step})
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().st_size > 0
  try:
    from tensorboard.backend.event_processing import event_accumulator
  except ImportError:  # not a dependency; the file's records are checked below instead
    event_accumulator = None
  if event_accumulator is not None:
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [0, 1, 2]
  # TFRecord framing: [length u64][crc u32][data][crc u32]; the scalar tags are in the data.
  data, payloads = events[0].read_bytes(), []
  while data:
    (length,) = struct.unpack("<Q", data[:8])
    payloads.append(data[12:12 + length])
    data = data[16 + length:]
  assert sum(b"loss" in p for p in payloads) == 3
  assert sum(b"accuracy" in p for p in payloads) == 3


def test_writing_imports_neither_tensorflow_nor_torch(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      from metadiff_jax import metrics
      with metrics.MetricWriter({str(tmp_path)!r}) as writer:
        writer.write(1, {{"loss": 1.0}})
      print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"tensorflow", "torch"}}))
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
  assert result.stdout.strip() == "[]"


def _png_size(path):
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", data[16:24])


def test_plot_curves(tmp_path):
  records = [{"step": s, "time": 0.0, "loss": 2.0 / s} for s in range(1, 20)]
  records += [{"step": s, "val_accuracy": 0.1 * s} for s in (5, 10, 15)]
  records += [{"step": 20, "loss": float("nan")}]
  path = str(tmp_path / "curves.png")
  out = metrics.plot_curves(records, ["loss", "val_accuracy", "absent"], path,
                            title="pretraining", logy_keys=("loss",))
  assert out == path
  width, height = _png_size(path)
  assert width > height > 0  # two panels side by side

  assert metrics.plot_curves(records, ["absent"], str(tmp_path / "none.png")) is None
  assert metrics.plot_curves([], ["loss"], str(tmp_path / "none.png")) is None
  assert not (tmp_path / "none.png").exists()


class _FakeClock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  fake = _FakeClock()
  monkeypatch.setattr(metrics.time, "monotonic", fake)
  return fake


def test_progress_logs_rate_and_eta(clock, caplog, monkeypatch):
  # Patched here, not in a fixture: pytest's capture swaps stderr back between phases.
  monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: log lines, no bar
  caplog.set_level(logging.INFO)
  with metrics.Progress(100, "train", initial=40, log_every_s=30.0) as bar:
    clock.now += 10.0
    bar.update(5, loss=0.123456)  # before log_every_s: nothing yet
    assert not caplog.records
    clock.now += 20.0
    bar.update(5)
    # 10 steps of this run (not the 40 before it) in 30 s; 50 left.
    assert caplog.messages == [
        "train: 50/100 (50%), 0.333 step/s, ETA 00:02:30, loss=0.1235"]
    clock.now += 5.0
    bar.update(2, loss="0.100")
  # close logs the final state.
  assert len(caplog.messages) == 2
  assert re.fullmatch(r"train: 52/100 \(52%\), 0.343 step/s, ETA \d\d:\d\d:\d\d, loss=0.100",
                      caplog.messages[-1])
  assert sys.stderr.getvalue() == ""


def test_progress_unknown_rate_and_disabled(clock, caplog, monkeypatch):
  monkeypatch.setattr(sys, "stderr", io.StringIO())
  caplog.set_level(logging.INFO)
  with metrics.Progress(10, "embed", unit="img", log_every_s=0.0):
    pass
  assert caplog.messages == []  # nothing happened, so nothing to report on closing
  with metrics.Progress(10, "embed", unit="img", log_every_s=0.0) as bar:
    bar.update(0, note="warming up")
    clock.now += 1.0
    bar.update(2)
  assert caplog.messages[0] == "embed: 0/10 (0%), 0 img/s, ETA ?, note=warming up"
  assert caplog.messages[1] == "embed: 2/10 (20%), 2 img/s, ETA 00:00:04, note=warming up"
  caplog.clear()
  with metrics.Progress(10, "quiet", enabled=False, log_every_s=0.0) as bar:
    bar.update(10)
  assert caplog.messages == [] and sys.stderr.getvalue() == ""


def test_progress_bar_on_a_terminal(monkeypatch, caplog):
  stream = io.StringIO()
  stream.isatty = lambda: True
  monkeypatch.setattr(sys, "stderr", stream)
  caplog.set_level(logging.INFO)
  with metrics.Progress(8, "train", initial=2) as bar:
    bar.update(3, loss=0.5)
  assert caplog.messages == []
  assert "train" in stream.getvalue() and "5/8" in stream.getvalue()
