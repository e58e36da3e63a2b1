"""The device mesh and data placement (`metadiff_jax.mesh`), on 1 and 8 simulated devices."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO
from metadiff_jax import mesh
from tiny_pipeline import cpu_env


def test_one_device_mesh():
  assert mesh.num_shards() == 1 and mesh.data_mesh().axis_names == (mesh.DATA,)
  assert mesh.padded_size(5) == 5
  x = mesh.shard_rows(6, lambda a, b: np.arange(a, b) * 2)
  np.testing.assert_array_equal(mesh.to_host(x), np.arange(6) * 2)
  tree = mesh.replicate({"a": np.ones(3), "b": np.int32(4)})
  assert tree["a"].sharding.is_fully_replicated and int(tree["b"]) == 4


@pytest.mark.parametrize("env, expected", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True), ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, True),
])
def test_cluster_detection_reads_the_environment(monkeypatch, env, expected):
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert mesh.cluster_detected() is expected


def test_incomplete_distributed_flags_are_refused():
  with pytest.raises(ValueError, match="need --coordinator_address"):
    mesh.initialize_distributed(num_processes=2)
  with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
    mesh.initialize_distributed("127.0.0.1:1234")
  # One process, explicitly: nothing to start.
  assert mesh.initialize_distributed("127.0.0.1:1234", 1, 0) is False


EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from metadiff_jax import mesh
    from metadiff_jax.data import episodes
    assert mesh.num_shards() == 8 and mesh.padded_size(5) == 8 and mesh.padded_size(16) == 16

    # Rows are drawn per device block, by global index, and land where they belong.
    calls = []
    def rows(a, b):
      calls.append((a, b))
      return {"x": np.arange(a, b, dtype=np.float32)[:, None] * np.ones(3, np.float32),
              "i": np.arange(a, b, dtype=np.int32)}
    tree = mesh.shard_rows(16, rows)
    assert sorted(calls) == [(2 * d, 2 * d + 2) for d in range(8)], calls
    assert tree["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(mesh.to_host(tree["i"]), np.arange(16))
    np.testing.assert_array_equal(mesh.to_host(tree["x"])[:, 0], np.arange(16))
    try:
      mesh.shard_rows(12, rows)
      raise AssertionError("12 rows over 8 devices must be refused")
    except ValueError as e:
      assert "multiple of 8" in str(e)

    # A constraint inside jit splits a batch computed from replicated inputs; values unchanged.
    table = mesh.replicate(episodes.class_table(np.repeat(np.arange(10), 7)))
    @jax.jit
    def draw(table, key):
      idx, cls = jax.vmap(episodes.draw_support, (None, None, 0, None, None))(
          table, key, jnp.arange(16), 5, 2)
      return mesh.constrain((idx, cls))
    idx, cls = draw(table, jax.random.key(0))
    assert idx.sharding.spec == jax.sharding.PartitionSpec("data"), idx.sharding
    single = jax.vmap(episodes.draw_support, (None, None, 0, None, None))(
        episodes.class_table(np.repeat(np.arange(10), 7)), jax.random.key(0), jnp.arange(16),
        5, 2)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(single[0]))
    state = mesh.replicate({"w": np.ones((4, 4), np.float32), "key": jax.random.key(3)})
    assert state["w"].sharding.is_fully_replicated
    assert state["key"].sharding.is_fully_replicated
    print("ok")
""")


def test_eight_simulated_devices():
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=REPO, env=cpu_env(8),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith("ok")
