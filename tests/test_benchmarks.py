"""The benchmark scripts run end to end on tiny sizes (their timings are not asserted)."""

import json
import math
import subprocess
import sys
import time

import jax
import pytest

from conftest import REPO
from metadiff_jax import tcunet


def _run(script, tmp_path, *flags):
  out = tmp_path / f"{script}.json"
  subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *flags,
                  "--out", str(out)], check=True, timeout=600, capture_output=True)
  return out, json.loads(out.read_text())


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def assert_describes_this_machine(result):
  """A benchmark's record names the backend, the JAX version and the day it ran on."""
  assert result["platform"] == jax.default_backend() and result["device"]
  assert result["jax_version"] == jax.__version__
  assert result["date"] <= time.strftime("%Y-%m-%d")  # today's, or yesterday's past midnight
  time.strptime(result["date"], "%Y-%m-%d")


@pytest.mark.slow  # a benchmark script's process: imports, compiles and times
def test_sampling_benchmark_runs_and_writes_json(tmp_path):
  _, result = _run("sampling", tmp_path, "--steps", "20", "--dim", "32", "--episodes", "2,3",
                   "--num_sampling_steps", "5", "--baseline_max_episodes", "2", "--repeats", "1")
  assert_describes_this_machine(result)
  assert result["reference"]
  assert result["steps"] == 20 and result["num_sampling_steps"] == [5]
  samplers = ["scan_fp32", "scan_fp32_highest", "scan_bf16", "scan_fp32_k5", "scan_bf16_k5"]
  rows = {(r["episodes"], r["sampler"]): r for r in result["rows"]}
  # The Python-loop baseline runs up to --baseline_max_episodes only.
  assert sorted(rows) == sorted([(2, "python_loop")] + [(b, s) for b in (2, 3) for s in samplers])
  for (episodes, sampler), row in rows.items():
    assert row["episodes_per_s"] > 0 and row["gflops"] > 0
    assert row["steps"] == (5 if sampler.endswith("_k5") else 20)
    assert 0 <= row["changed"] <= 1 and 0 <= row["accuracy"] <= 1
    assert row["agreement_episodes"] == episodes
    if episodes == 2:
      assert row["over_loop"] == rows[(2, "python_loop")]["seconds"] / row["seconds"]
    else:
      assert row["over_loop"] is None
  for episodes in (2, 3):
    reference = rows[(episodes, "scan_fp32_highest")]
    assert reference["changed"] == 0 and reference["max_rel_diff"] == 0
    assert rows[(episodes, "scan_fp32")]["max_rel_diff"] < 1e-4
    assert rows[(episodes, "scan_bf16")]["max_rel_diff"] < 5e-2
  assert rows[(2, "python_loop")]["max_rel_diff"] < 1e-4  # the baseline computes the same
  # FLOPs of D = 32, widths (16, 8, 8, 16, 32), E = 320, N = 5, counted by hand:
  # per episode the feature transforms and elementwise work, per batch the time layers.
  per_episode = 2 * 5 * (32 * 16 + 16 * 8 + 8 * 8 + 8 * 16 + 16 * 32) + 12 * 5 * 32
  per_batch = 2 * 320 * (16 + 8 + 8 + 16 + 32) + 2 * 320 * 160 + 2 * 160
  for row in result["rows"]:
    assert row["flops"] == row["steps"] * (row["episodes"] * per_episode + per_batch)
  assert tcunet.TCUNet(feature_dim=32).widths == (16, 8, 8, 16, 32)


def test_data_pipeline_benchmark_runs_and_writes_json(tmp_path):
  _, result = _run("data_pipeline", tmp_path, "--image_size", "16", "--split_images", "1280",
                   "--batch_size", "16", "--batches", "2", "--episodes", "10", "--feature_dim",
                   "8", "--repeats", "1")
  pre = result["pretraining"]
  assert pre["device_images_per_s"] > 0 and pre["host_numpy_images_per_s"] > 0
  assert abs(pre["device_over_host"] * pre["host_numpy_images_per_s"]
             - pre["device_images_per_s"]) < 1e-6 * pre["device_images_per_s"]
  assert result["episodes"]["sampler_episodes_per_s"] > 0
  assert result["settings"]["batch_size"] == 16


@pytest.mark.slow  # a benchmark script's process: imports, compiles and times
def test_pretrain_benchmark_runs_and_writes_json(tmp_path):
  _, result = _run("pretrain", tmp_path, "--backbone", "conv4", "--image_size", "16",
                   "--batch", "8", "--train_images", "64", "--steps", "2", "--num_images",
                   "100", "--classes", "5", "--extract_batch", "32", "--episodes", "10",
                   "--repeats", "1")
  names = [r["name"] for r in result["rows"]]
  assert names == ["pretrain_device_fp32", "pretrain_device_bf16", "pretrain_host_fp32",
                   "extract_device_fp32", "extract_device_bf16", "extract_host_fp32"]
  for r in result["rows"]:
    assert _positive(r["images_per_s"]) and _positive(r["ratio_to_baseline"]), r
    baseline = next(b for b in result["rows"] if b["name"] == r["baseline"])
    assert math.isclose(r["ratio_to_baseline"], baseline["seconds"] / r["seconds"])
  assert result["images_per_s"]["pretrain_host_fp32"] == result["rows"][2]["images_per_s"]
  agree = result["bf16_agreement"]
  assert 0 <= agree["mean_relative_l2_error"] <= agree["max_relative_l2_error"] < 0.1
  for shots in (1, 5):
    assert 0 <= agree[f"ncm_unchanged_{shots}shot"] <= 1
  assert result["feature_dim"] == 64  # Conv4 on 16x16: a 1x1x64 final map
  assert result["settings"]["batch"] == 8
  assert_describes_this_machine(result)


@pytest.mark.slow  # a benchmark script's process: imports, compiles and times
def test_pretrain_benchmark_runs_on_one_channel_images(tmp_path):
  _, result = _run("pretrain", tmp_path, "--image_size", "16", "--channels", "1", "--batch",
                   "8", "--train_images", "32", "--steps", "1", "--num_images", "100",
                   "--classes", "5", "--extract_batch", "50", "--episodes", "5", "--repeats",
                   "1")
  assert "flip=False" in result["augmentation"]  # the glyph set's augmentations
  assert all(_positive(r["images_per_s"]) for r in result["rows"])
  assert result["settings"]["channels"] == 1 and result["feature_dim"] == 64  # Conv4, 16x16


@pytest.mark.slow  # a benchmark script's process: imports, compiles and times
def test_memory_benchmark_runs_and_writes_json_and_plot(tmp_path):
  out, result = _run("memory", tmp_path, "--steps", "10", "--dim", "16", "--episodes", "1,4")
  assert [r["episodes"] for r in result["rows"]] == [1, 4]
  for r in result["rows"]:
    for kind in ("sampler", "trajectory", "train_step"):
      m = r[kind]
      assert _positive(m["total_bytes"]), (kind, m)
      assert m["total_bytes"] == (m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"]
                                  - m["alias_bytes"])
    # The trajectory baseline returns [B, T + 1, N, D] float32 on top of the final weights.
    assert r["trajectory"]["output_bytes"] >= r["episodes"] * 11 * 5 * 16 * 4
    assert r["trajectory_over_sampler"] > 1
    assert r["trajectory_over_sampler"] == (r["trajectory"]["total_bytes"]
                                            / r["sampler"]["total_bytes"])
  assert result["rows"][1]["trajectory"]["total_bytes"] > result["rows"][0]["trajectory"][
      "total_bytes"]
  executed = result["executed"]
  assert executed["episodes"] == 1
  assert executed["trajectory"]["output_shapes"] == [[1, 5, 16], [1, 11, 5, 16]]
  assert all(executed[k]["finite"] for k in ("sampler", "trajectory", "train_step"))
  assert result["plot"] == str(out.with_suffix(".png"))
  assert out.with_suffix(".png").stat().st_size > 0


def test_benchmarks_import_without_the_config_and_data_stacks():
  # The GPU machines lack ml_collections, tensorflow-datasets and tensorboardX.
  code = (
      "import sys\n"
      "for name in ('ml_collections', 'tensorflow_datasets', 'tensorflow', 'tensorboardX'):\n"
      "  sys.modules[name] = None\n"
      f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
      "import pretrain, memory\n"
      "bad = sorted(m for m in sys.modules if m.startswith(('metadiff_jax.stages', "
      "'metadiff_jax.config_lib', 'metadiff_jax.metrics')))\n"
      "assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.slow  # a benchmark script's process: imports, compiles and times
def test_train_head_benchmark_runs_and_writes_json(tmp_path):
  _, result = _run("train_head", tmp_path, "--episodes", "4,8", "--steps_per_call", "3",
                   "--calls", "1", "--baseline_steps", "2", "--baseline_max_episodes", "4",
                   "--classes", "6", "--images_per_class", "5", "--dim", "16", "--steps", "10")
  rows = result["rows"]
  assert [r["episodes_per_step"] for r in rows] == [4, 8]
  assert all(_positive(r["scan_episodes_per_s"]) for r in rows)
  assert _positive(rows[0]["scan_over_loop"]) and "loop_s_per_step" not in rows[1]
  assert_describes_this_machine(result)


@pytest.mark.slow  # a benchmark script's process: imports, compiles and times
def test_eval_end_to_end_benchmark_runs_and_writes_json(tmp_path):
  _, result = _run("eval_end_to_end", tmp_path, "--image_size", "16", "--classes", "6",
                   "--images_per_class", "20", "--embed_batch", "32", "--episodes", "6",
                   "--batch_episodes", "4", "--steps", "10", "--baseline_episodes", "2")
  assert result["num_images"] == 120 and result["feature_dim"] == 64
  for key in ("embed_s", "episodes_s", "total_s", "baseline_episodes_per_s"):
    assert _positive(result[key]), key
  assert math.isclose(result["total_s"], result["embed_s"] + result["episodes_s"])
  assert math.isclose(result["episodes_per_s"], 6 / result["episodes_s"])
  # The baseline (one episode at a time, Python loop) classifies as the batched sampler does,
  # up to queries whose two best scores nearly tie (two compiled programs round differently).
  assert result["baseline_accuracy_equal"] == 2
  assert 0 <= result["mean_accuracy"] <= 1
