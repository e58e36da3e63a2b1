"""One run, three layouts: 1 CPU device, 8 simulated devices, and 2 processes on localhost.

Each layout runs the tiny pipeline from the command line (pretraining, prototypes, diffusion
training and evaluation) and must give the numbers of the 1-device run: every batch is a
function of (seed, index) and is split over the data mesh, so only the order in which
reductions add up differs (hence a float tolerance, not equality). With 2 processes only
process 0 may write files.
"""

import json
import socket
import subprocess

import numpy as np
import pytest

from conftest import REPO
from tiny_pipeline import TINY_OVERRIDES, cpu_env, main_command, run_main


def pipeline_args(data_dir, workdir):
  return ["--config=configs/glyphs_conv4.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *TINY_OVERRIDES]


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(workdir, stage, key):
  """{step: value} of one metric of a stage's metrics.jsonl, each step written once."""
  records = [r for r in read_jsonl(workdir / stage / "metrics.jsonl") if key in r]
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), f"{stage}/{key} written twice at some step: {steps}"
  return {r["step"]: r[key] for r in records}


def accuracies(workdir):
  with open(workdir / "results.json") as f:
    results = json.load(f)["results"]["1shot"]
  return {name: results[name]["mean"] for name in ("metadiff", "untrained", "prototypes")}


def assert_same_run(workdir, reference):
  """The losses, validation figures and test accuracies of two runs agree."""
  for stage, key, rtol in (("pretrain", "loss", 1e-4), ("pretrain", "val_accuracy", 0),
                           ("train_1shot", "loss", 1e-3),
                           ("train_1shot", "val_accuracy", 0)):
    got, want = series(workdir, stage, key), series(reference, stage, key)
    assert got.keys() == want.keys(), (stage, key)
    steps = sorted(want)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=rtol,
                               atol=2e-3 if "accuracy" in key else 0,
                               err_msg=f"{stage}/{key}")
  got, want = accuracies(workdir), accuracies(reference)
  for name in want:
    # 20 episodes of 75 queries: one changed prediction moves the mean by 1/1500.
    assert abs(got[name] - want[name]) <= 1.5e-3, (name, got, want)


@pytest.fixture(scope="module")
def one_device_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device") / "run"
  proc = run_main(*pipeline_args(data_dir, workdir), devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "data mesh of 1" in proc.stderr
  return workdir


def test_eight_devices_give_the_numbers_of_one(data_dir, tmp_path, one_device_run):
  workdir = tmp_path / "run"
  proc = run_main(*pipeline_args(data_dir, workdir), devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "8 cpu device(s)" in proc.stderr and "data mesh of 8" in proc.stderr
  assert_same_run(workdir, one_device_run)


def test_a_batch_that_does_not_split_over_the_devices_is_refused(data_dir, tmp_path):
  proc = run_main(*pipeline_args(data_dir, tmp_path / "run"),
                  "--config.train.episodes_per_step=6", devices=4)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.train.episodes_per_step = 6 does not split over the 4 devices of this "
      "run; make it a multiple of 4")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_the_numbers_of_one(data_dir, tmp_path, one_device_run):
  workdir = tmp_path / "run"
  port = free_port()
  procs = []
  for pid in range(2):
    args = pipeline_args(data_dir, workdir) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"]
    log = open(tmp_path / f"process_{pid}.log", "w+")
    procs.append((subprocess.Popen(main_command(*args), cwd=REPO, env=cpu_env(1),
                                   stdout=log, stderr=subprocess.STDOUT, text=True), log))
  outputs = []
  for proc, log in procs:
    try:
      proc.wait(timeout=600)
    finally:
      if proc.poll() is None:
        proc.kill()
    log.seek(0)
    outputs.append(log.read())
    log.close()
  for pid, (proc, _) in enumerate(procs):
    assert proc.returncode == 0, f"process {pid}:\n{outputs[pid][-3000:]}"
  assert "2 cpu device(s)" in outputs[0] and "in 2 process(es)" in outputs[0]
  # Process 0 logs and prints the table; process 1 stays quiet.
  assert "| MetaDiff (trained TCUNet, EMA) |" in outputs[0]
  assert "| MetaDiff" not in outputs[1] and "stage pretrain: starting" not in outputs[1]
  assert_same_run(workdir, one_device_run)  # also: every metric written once
