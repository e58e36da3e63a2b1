"""The benchmark scripts run end to end on tiny sizes (their timings are not asserted)."""

import json
import subprocess
import sys

from conftest import REPO
from metadiff_jax import tcunet


def test_sampling_benchmark_runs_and_writes_json(tmp_path):
  out = tmp_path / "sampling.json"
  subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "sampling.py"), "--steps", "10", "--dim", "32",
       "--episodes", "1,3", "--repeats", "1", "--out", str(out)],
      check=True, timeout=600, capture_output=True)
  result = json.loads(out.read_text())
  assert [r["episodes"] for r in result["rows"]] == [1, 3]
  for row in result["rows"]:
    assert row["scan_episodes_per_s"] > 0 and row["loop_episodes_per_s"] > 0
    assert row["scan_over_loop"] == row["loop_s"] / row["scan_s"]
  # FLOPs of D = 32, widths (16, 8, 8, 16, 32), E = 320, N = 5, T = 10, counted by hand:
  # per episode the feature transforms and elementwise work, per batch the time layers.
  per_episode = 2 * 5 * (32 * 16 + 16 * 8 + 8 * 8 + 8 * 16 + 16 * 32) + 12 * 5 * 32
  per_batch = 2 * 320 * (16 + 8 + 8 + 16 + 32) + 2 * 320 * 160 + 2 * 160
  for row in result["rows"]:
    assert row["flops"] == 10 * (row["episodes"] * per_episode + per_batch)
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
