"""Checkpoints: exact round trips, retention, metadata, clear errors, and atomic saves."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from metadiff_jax import checkpoint
from metadiff_jax.checkpoint import Checkpoints

REPO = pathlib.Path(__file__).parent.parent


class EmaState(train_state.TrainState):
  """A TrainState with the extra fields the stages carry."""

  ema_params: Any = None
  batch_stats: Any = None


def _state(seed: int, width: int = 4, steps: int = 2) -> EmaState:
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, width)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(width,)), jnp.bfloat16)}}
  state = EmaState.create(
      apply_fn=None, params=params, tx=optax.adam(1e-2),
      ema_params=jax.tree.map(lambda p: p * 0.5, params),
      batch_stats={"bn": {"mean": jnp.asarray(rng.normal(size=(width,)), jnp.float32),
                          "count": jnp.asarray(7, jnp.int32)}})
  for _ in range(steps):  # non-trivial adam moments and count
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    state = state.apply_gradients(grads=grads)
  return state


def _assert_identical(actual, expected):
  """Same leaves at the same paths, with the same types, dtypes and values."""
  actual, expected = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (actual, expected))
  assert [p for p, _ in actual] == [p for p, _ in expected]
  for (path, a), (_, e) in zip(actual, expected):
    assert type(a) is type(e), (jax.tree_util.keystr(path), type(a), type(e))
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_a_checkpoint_reads_back_as_saved_without_a_template(tmp_path):
  directory = str(tmp_path / "ckpt")
  assert checkpoint.read_latest(directory) is None  # no folder
  os.makedirs(directory)
  assert checkpoint.read_latest(directory) is None  # no step in it
  first, second = _state(seed=0), _state(seed=1)
  with Checkpoints(directory) as ckpts:
    ckpts.save(3, first, {"epoch": 1})
    ckpts.save(5, second, {"epoch": 2, "image_shape": [32, 32, 1]})
    tree, meta = ckpts.restore_saved(step=3)
  assert meta == {"epoch": 1}
  _assert_identical(tree["params"], first.params)
  tree, meta = checkpoint.read_latest(directory)
  assert meta == {"epoch": 2, "image_shape": [32, 32, 1]}
  assert isinstance(tree, dict) and int(tree["step"]) == int(second.step)
  _assert_identical(tree["ema_params"], second.ema_params)
  _assert_identical(tree["batch_stats"], second.batch_stats)


def test_train_state_round_trip_is_exact(tmp_path):
  saved = _state(seed=0)
  ckpts = Checkpoints(str(tmp_path / "ckpt"))
  assert ckpts.latest_step() is None
  ckpts.save(2, saved, {"val_accuracy": 0.5, "done": False})
  ckpts.close()

  template = _state(seed=1, steps=0)  # other values, same structure
  restored, metadata = Checkpoints(str(tmp_path / "ckpt")).restore(template)
  assert isinstance(restored, EmaState)
  assert restored.step == 2 and isinstance(restored.step, int)
  # Static fields (apply_fn, tx) come from the template, as does the tree structure.
  assert jax.tree.structure(restored) == jax.tree.structure(template)
  _assert_identical(restored, saved)
  kernel = restored.params["dense"]["kernel"]
  assert kernel.sharding == template.params["dense"]["kernel"].sharding
  assert metadata == {"val_accuracy": 0.5, "done": False}
  # The restored optimiser state carries on exactly as the saved one would.
  grads = jax.tree.map(jnp.ones_like, saved.params)
  _assert_identical(restored.apply_gradients(grads=grads), saved.apply_gradients(grads=grads))


def test_restore_takes_the_template_dtype(tmp_path):
  ckpts = Checkpoints(str(tmp_path))
  ckpts.save(1, {"w": jnp.arange(4, dtype=jnp.float32)})
  restored, metadata = ckpts.restore({"w": jax.ShapeDtypeStruct((4,), jnp.bfloat16)})
  assert restored["w"].dtype == jnp.bfloat16 and metadata == {}
  np.testing.assert_array_equal(np.asarray(restored["w"], np.float32), np.arange(4))


def _child_env(**extra: str) -> dict[str, str]:
  pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath, **extra}


def _run_child(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", script, *args], env=_child_env(**env),
                        capture_output=True, text=True, timeout=120)


def test_restore_takes_the_template_shardings(tmp_path):
  # Four CPU devices need a fresh process; the template swaps the saved shardings.
  script = textwrap.dedent("""
      import sys
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from metadiff_jax.checkpoint import Checkpoints

      mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      x = jnp.arange(32.0).reshape(8, 4)
      Checkpoints(sys.argv[1]).save(1, {
          "a": jax.device_put(x, NamedSharding(mesh, P())),
          "b": jax.device_put(x, NamedSharding(mesh, P("data")))})
      template = {
          "a": jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P("data"))),
          "b": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P()))}
      restored, _ = Checkpoints(sys.argv[1]).restore(template)
      for name in "ab":
        assert restored[name].sharding == template[name].sharding, name
        np.testing.assert_array_equal(restored[name], x)
      print("restored", {k: tuple(v.sharding.spec) for k, v in restored.items()})
  """)
  result = _run_child(script, str(tmp_path),
                      XLA_FLAGS="--xla_force_host_platform_device_count=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "restored {'a': ('data',), 'b': ()}" in result.stdout


def test_max_to_keep_and_steps(tmp_path):
  with Checkpoints(str(tmp_path), max_to_keep=2) as ckpts:
    for step in (1, 2, 3, 4):
      ckpts.save(step, {"w": jnp.full((2,), step)})
    assert ckpts.all_steps() == [3, 4]
  ckpts = Checkpoints(str(tmp_path), max_to_keep=2)
  assert ckpts.latest_step() == 4 and ckpts.all_steps() == [3, 4]
  restored, _ = ckpts.restore({"w": jnp.zeros((2,), jnp.int32)}, step=3)
  np.testing.assert_array_equal(restored["w"], [3, 3])
  with pytest.raises(FileNotFoundError):
    ckpts.restore({"w": jnp.zeros((2,), jnp.int32)}, step=1)

  keep_all = Checkpoints(str(tmp_path / "all"), max_to_keep=None)
  for step in range(1, 5):
    keep_all.save(step, {"w": jnp.zeros(())})
  assert keep_all.all_steps() == [1, 2, 3, 4]


def test_metadata_without_arrays(tmp_path):
  ckpts = Checkpoints(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    ckpts.metadata()
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    ckpts.restore({"w": jnp.zeros(())})
  ckpts.save(1, {"w": jnp.zeros(())}, {"val_accuracy": 0.25, "epoch": 1, "note": None})
  ckpts.save(5, {"w": jnp.zeros(())}, {"done": True, "nested": {"a": [1, 2]}})
  assert ckpts.metadata() == {"done": True, "nested": {"a": [1, 2]}}
  assert ckpts.metadata(1) == {"val_accuracy": 0.25, "epoch": 1, "note": None}
  assert Checkpoints(str(tmp_path)).metadata() == {"done": True, "nested": {"a": [1, 2]}}


def test_save_must_move_forward(tmp_path):
  ckpts = Checkpoints(str(tmp_path))
  ckpts.save(3, {"w": jnp.zeros(())})
  for step in (3, 2):
    with pytest.raises(ValueError, match="only move forward"):
      ckpts.save(step, {"w": jnp.ones(())})
  assert ckpts.all_steps() == [3]


@pytest.mark.parametrize("change, expected", [
    ("shape", "params/dense/kernel (3, 4) vs (3, 5)"),
    ("missing", "missing ema_params/extra"),
    ("extra", "not in the template ema_params/dense/bias"),
])
def test_mismatching_template_is_one_line_value_error(tmp_path, change, expected):
  ckpts = Checkpoints(str(tmp_path))
  ckpts.save(1, _state(seed=0))
  template = _state(seed=0, width=5 if change == "shape" else 4, steps=0)
  kernel = template.ema_params["dense"]["kernel"]
  if change == "missing":  # the template has a leaf the checkpoint lacks
    template = template.replace(ema_params=dict(template.ema_params, extra=jnp.zeros(())))
  elif change == "extra":  # the checkpoint has a leaf the template lacks
    template = template.replace(ema_params={"dense": {"kernel": kernel}})
  with pytest.raises(ValueError) as info:
    ckpts.restore(template)
  message = str(info.value)
  assert "\n" not in message
  assert expected in message
  assert f"delete {tmp_path}" in message


# The child saves step 1, then saves step 2 with a hook that announces itself through a marker
# file and then blocks, so the parent kills it at a known point of the save.
_CHILD = textwrap.dedent("""
    import os, sys, time
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from metadiff_jax.checkpoint import Checkpoints

    directory, marker, hook = sys.argv[1:]

    def block(where):
      with open(marker, "w") as f:
        f.write(where)
      time.sleep(300)

    ckpts = Checkpoints(directory)
    ckpts.save(1, {"w": jnp.full((256,), 1.0)}, {"step": 1})
    if hook == "before_commit":
      # Blocks the rename of the step's tmp directory into the checkpoints directory (the
      # items inside it have been renamed into place already): everything is written and
      # only the commit is missing.
      rename = os.rename
      def blocking_rename(src, dst, *args, **kwargs):
        if os.path.dirname(os.path.abspath(dst)) == os.path.abspath(directory):
          block(os.fspath(src))
        return rename(src, dst, *args, **kwargs)
      os.rename = blocking_rename
    else:
      # While the items are being written.
      for name in ("save", "async_save"):
        original = getattr(ocp.JsonCheckpointHandler, name)
        def blocking(self, directory, *args, _original=original, **kwargs):
          block(os.fspath(directory))
          return _original(self, directory, *args, **kwargs)
        setattr(ocp.JsonCheckpointHandler, name, blocking)
    ckpts.save(2, {"w": jnp.full((256,), 2.0)}, {"step": 2})
    print("the save of step 2 was not interrupted")
""")


@pytest.mark.parametrize("hook", ["while_writing", "before_commit"])
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, hook):
  directory, marker, log = tmp_path / "ckpt", tmp_path / "marker", tmp_path / "child.log"
  with open(log, "w") as output:  # a file, not a pipe, which a chatty child could fill
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory), str(marker), hook],
                             env=_child_env(), stdout=output, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 60
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    if not marker.exists():
      pytest.fail(f"the child never reached the save hook:\n{log.read_text()[-3000:]}")
    # The child is now inside the hook, which only ever sleeps: the save of step 2 is
    # under way and cannot finish before the kill.
    partial = sorted(p for p in directory.iterdir() if p.name.startswith("2"))
    partial_contents = {p.name: sorted(q.name for q in p.iterdir()) for p in partial}
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
  finally:
    if child.poll() is None:
      child.kill()
      child.wait(timeout=30)
  assert child.returncode == -signal.SIGKILL
  # The kill did land mid-save: step 2 was begun but never committed.
  assert len(partial) == 1 and partial[0].name != "2", partial_contents
  if hook == "before_commit":  # and, here, with every item written
    assert {"state", "metadata"} <= set(partial_contents[partial[0].name]), partial_contents

  ckpts = Checkpoints(str(directory))
  assert partial[0].exists()  # still there, and still not taken for a checkpoint
  assert ckpts.latest_step() == 1 and ckpts.all_steps() == [1]
  restored, metadata = ckpts.restore({"w": jnp.zeros((256,), jnp.float32)})
  np.testing.assert_array_equal(restored["w"], np.ones(256))
  assert metadata == {"step": 1}
  ckpts.save(2, {"w": jnp.full((256,), 3.0)}, {"step": 2})
  assert ckpts.all_steps() == [1, 2]
  restored, metadata = Checkpoints(str(directory)).restore({"w": jnp.zeros((256,))})
  np.testing.assert_array_equal(restored["w"], np.full(256, 3.0))
  assert metadata == {"step": 2}
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
