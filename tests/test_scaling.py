"""One run, three layouts: 1 CPU device, 8 simulated devices, and 2 processes on localhost.

Each layout runs the tiny pipeline from the command line (pretraining, prototypes, diffusion
training and evaluation). Every batch is a function of (seed, index) and is split over the
data mesh, so the layouts compute the same thing; what differs is how training's reductions
(gradients and BatchNorm statistics summed over the batch) split across devices, so the trained
weights agree only up to rounding. The tests check, as docs/SCALING.md states:

- evaluation does not depend on the layout: the weights a layout trained, evaluated here on
  one device, give exactly the accuracies and confidence intervals that layout reported;
- training does, by rounding only: losses agree to a relative 1e-4 (pretraining) and 1e-3
  (diffusion), test features to `FEATURE_TOLERANCE` and sampled prototypes to
  `WEIGHT_TOLERANCE`, and so the accuracies differ by at most the fraction of queries whose
  two best scores are closer than those tolerances allow (tests/near_ties.py).

With 2 processes only process 0 may write files.
"""

import json
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest

import near_ties
from conftest import CLI_RUN_OVERRIDES, REPO
from tiny_pipeline import (TINY_OVERRIDES, command_error, cpu_env, episode_scores, main_command,
                           run_main, tiny_config)
from metadiff_jax import mesh, metrics
from metadiff_jax.stages import evaluate

# How far apart the layouts' trained weights may take the test features (each row's relative
# change) and the prototypes sampled from them. Measured on 8 devices: 2.5e-5 and 2.0e-5 for
# the tiny config (32 pretraining steps, 20 diffusion steps); the bounds leave a factor of 4.
FEATURE_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-4
ROWS = ("metadiff", "untrained", "prototypes")


def pipeline_args(data_dir, workdir, diagnostics=True):
  """The tiny pipeline's command line. Without `diagnostics`, the eval stage skips the
  held-out noise error (its compilation is most of the stage; the 2-process run keeps it)."""
  return ["--config=configs/glyphs_conv4.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *TINY_OVERRIDES,
          *([] if diagnostics else CLI_RUN_OVERRIDES)]


def series(workdir, stage, key):
  """{step: value} of one metric of a stage's metrics.jsonl, each step written once."""
  records = [r for r in metrics.read_jsonl(str(workdir / stage / "metrics.jsonl")) if key in r]
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), f"{stage}/{key} written twice at some step: {steps}"
  return {r["step"]: r[key] for r in records}


def results(workdir):
  with open(workdir / "results.json") as f:
    return json.load(f)["results"]["1shot"]


def assert_same_training(workdir, reference):
  """The losses and validation figures of two runs agree up to rounding."""
  for stage, key, rtol in (("pretrain", "loss", 1e-4), ("pretrain", "val_accuracy", 0),
                           ("train_1shot", "loss", 1e-3),
                           ("train_1shot", "val_accuracy", 0)):
    got, want = series(workdir, stage, key), series(reference, stage, key)
    assert got.keys() == want.keys(), (stage, key)
    steps = sorted(want)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=rtol,
                               atol=2e-3 if "accuracy" in key else 0,
                               err_msg=f"{stage}/{key}")


def assert_same_numbers(config, workdir, reference, reference_scores):
  """What a layout reported is what its weights give on one device, and within the near-ties
  of the reference run's (one device) numbers."""
  # Evaluation alone: the layout's weights, evaluated here on one device from scratch
  # (features embedded again), give exactly the accuracies and intervals it reported. The
  # stages read only the best checkpoints (without the others there is no last-checkpoint row
  # to sample as well).
  again = workdir.parent / f"{workdir.name}_again"
  shutil.copytree(workdir, again, ignore=shutil.ignore_patterns(
      "features", "eval", "results.*", "checkpoints"))
  here = evaluate.stage(config, str(again))["results"]["1shot"]
  reported = results(workdir)
  for row in ROWS:
    for field in ("mean", "ci95", "n"):
      assert here[row][field] == reported[row][field], (row, field, here[row], reported[row])
    # A mean over 5 prototype norms, summed in another order: one float32 rounding.
    assert here[row]["norm_ratio"] == pytest.approx(reported[row]["norm_ratio"], rel=1e-6)

  # Training: the layout's weights are the reference's up to rounding.
  scores = episode_scores(config, workdir)
  moved = near_ties.relative_errors(scores["features"], reference_scores["features"])
  assert moved.max() <= FEATURE_TOLERANCE, moved.max()
  dim = scores["features"].shape[1]
  rounding = near_ties.cosine_rounding_tolerance(dim, shots=1)
  want = results(reference)
  for row in ROWS:
    got, ref = scores[row], reference_scores[row]
    if row == "prototypes":  # 1 shot: the prototypes are support features
      weights_moved = FEATURE_TOLERANCE
    else:
      moved = near_ties.relative_errors(got["weights"], ref["weights"])
      assert moved.max() <= WEIGHT_TOLERANCE, (row, moved.max())
      weights_moved = WEIGHT_TOLERANCE
    tol = near_ties.cosine_perturbation_tolerance(FEATURE_TOLERANCE, weights_moved) + rounding
    near = near_ties.margins(ref["scores"]) < tol
    near_ties.assert_within_near_ties(reported[row], want[row], near, row)


@pytest.fixture(scope="module")
def reference(data_dir, cli_run):
  """(config, workdir, per-query scores) of the one-device run (conftest's `cli_run`, the
  command line of `pipeline_args(..., diagnostics=False)`)."""
  if jax.default_backend() != "cpu":
    pytest.skip("compares with CPU runs: run the tests with JAX_PLATFORMS=cpu")
  assert "data mesh of 1" in cli_run.stderr
  config = tiny_config(data_dir, eval__diagnostic_episodes=0)
  return config, cli_run.workdir, episode_scores(config, cli_run.workdir)


def test_eight_devices_give_the_numbers_of_one(data_dir, tmp_path, reference):
  config, one_device, scores = reference
  workdir = tmp_path / "run"
  proc = run_main(*pipeline_args(data_dir, workdir, diagnostics=False), devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "8 cpu device(s)" in proc.stderr and "data mesh of 8" in proc.stderr
  assert_same_training(workdir, one_device)
  assert_same_numbers(config, workdir, one_device, scores)


def test_a_batch_that_does_not_split_over_the_devices_is_refused(monkeypatch):
  monkeypatch.setattr(mesh, "num_shards", lambda: 4)  # as in a run on 4 devices
  assert command_error("--config=configs/glyphs_conv4.py", *TINY_OVERRIDES,
                       "--config.train.episodes_per_step=6") == (
      "config.train.episodes_per_step = 6 does not split over the 4 devices of this run; make "
      "it a multiple of 4")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_the_numbers_of_one(data_dir, tmp_path, reference):
  config, one_device, scores = reference
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
  assert_same_training(workdir, one_device)  # also: every metric written once
  assert_same_numbers(config, workdir, one_device, scores)


# ----------------------------------------------------------------------------- the bounds

def test_float32_cosine_scores_stay_within_the_rounding_tolerance():
  """The eval stage's float32 10 x cosine against float64: each score within half the
  tolerance (a flip needs two scores to move), for the feature sizes of the configs."""
  from metadiff_jax import prototypes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for dim, shots in ((64, 1), (640, 5)):
    support = np.abs(rng.normal(size=(20, 5 * shots, dim))).astype(np.float32)
    query = np.abs(rng.normal(size=(20, 75, dim))).astype(np.float32)
    labels = np.tile(np.repeat(np.arange(5), shots), (20, 1))
    means = jax.vmap(prototypes.class_means, (0, 0, None))(support, labels, 5)
    got = np.asarray(prototypes.cosine_logits(query, means, scale=10.0))
    exact_means = np.stack([support[:, labels[0] == k].astype(np.float64).mean(1)
                            for k in range(5)], axis=1)
    error = np.abs(got - near_ties.cosine_scores(query, exact_means)).max()
    assert error <= near_ties.cosine_rounding_tolerance(dim, shots) / 2, (dim, shots, error)


def test_a_flip_counts_only_where_the_scores_nearly_tie():
  """Accuracies may differ by the near-ties, and by nothing else."""
  scores = np.tile(np.array([[3.0, 1.0, 0.0]]), (4, 2, 1))  # 4 episodes of 2 queries
  scores[1, 0, :2] = 2.0, 2.0 - 1e-6  # one near-tie
  labels = np.zeros((4, 2), int)
  near = near_ties.margins(scores) < 1e-4
  assert near.sum() == 1 and near[1, 0]
  want = metrics.summarize(np.mean(scores.argmax(-1) == labels, -1))
  flipped = scores.copy()
  flipped[1, 0, 1] += 2e-6  # the near-tie goes the other way
  got = metrics.summarize(np.mean(flipped.argmax(-1) == labels, -1))
  assert got["mean"] != want["mean"]  # what an exact comparison would reject
  near_ties.assert_within_near_ties(got, want, near)
  clear = flipped.copy()
  clear[2, 1, 1] = 4.0  # and a query far from any tie changes its answer: one flip too many
  wrong = metrics.summarize(np.mean(clear.argmax(-1) == labels, -1))
  with pytest.raises(AssertionError, match="near-ties"):
    near_ties.assert_within_near_ties(wrong, want, near)
