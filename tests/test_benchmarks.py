"""The benchmark scripts run end to end on tiny sizes (their timings are not asserted)."""

import json
import subprocess
import sys

from conftest import REPO
from metadiff_jax import tcunet


def test_sampling_benchmark_runs_and_writes_json(tmp_path):
  out = tmp_path / "sampling.json"
  subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "sampling.py"), "--steps", "20", "--dim", "32",
       "--episodes", "2,3", "--num_sampling_steps", "5", "--baseline_max_episodes", "2",
       "--repeats", "1", "--out", str(out)],
      check=True, timeout=600, capture_output=True)
  result = json.loads(out.read_text())
  for key in ("device", "platform", "jax_version", "date", "reference"):
    assert result[key]
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
  out = tmp_path / "data.json"
  subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "data_pipeline.py"), "--image_size", "16",
       "--split_images", "1280", "--batch_size", "16", "--batches", "2", "--episodes", "10",
       "--feature_dim", "8", "--repeats", "1", "--out", str(out)],
      check=True, timeout=600, capture_output=True)
  result = json.loads(out.read_text())
  pre = result["pretraining"]
  assert pre["device_images_per_s"] > 0 and pre["host_numpy_images_per_s"] > 0
  assert abs(pre["device_over_host"] * pre["host_numpy_images_per_s"]
             - pre["device_images_per_s"]) < 1e-6 * pre["device_images_per_s"]
  assert result["episodes"]["sampler_episodes_per_s"] > 0
  assert result["settings"]["batch_size"] == 16
