"""Checkpoints: exact round trips, retention, metadata, clear errors, atomic saves, any device
layout, and unreadable steps."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import socket
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

from metadiff_jax import checkpoint, training_loop
from metadiff_jax.checkpoint import Checkpoints
from metadiff_jax.errors import TrainingError, UserError
from tiny_pipeline import xla_flags

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
                      XLA_FLAGS=xla_flags(4))
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
    ("shape", "batch_stats/bn/mean has shape (4,) in the checkpoint and (5,) in this config"
     " (and 8 more differences)"),
    ("missing", "ema_params/extra is in this config but not in the checkpoint"),
    ("extra", "ema_params/dense/bias is in the checkpoint but not in this config"),
])
def test_mismatching_template_is_one_short_line(tmp_path, change, expected):
  ckpts = Checkpoints(str(tmp_path))
  ckpts.save(1, _state(seed=0))
  template = _state(seed=0, width=5 if change == "shape" else 4, steps=0)
  kernel = template.ema_params["dense"]["kernel"]
  if change == "missing":  # the template has a leaf the checkpoint lacks
    template = template.replace(ema_params=dict(template.ema_params, extra=jnp.zeros(())))
  elif change == "extra":  # the checkpoint has a leaf the template lacks
    template = template.replace(ema_params={"dense": {"kernel": kernel}})
  with pytest.raises(checkpoint.CheckpointMismatchError) as info:
    ckpts.restore(template)
  assert isinstance(info.value, UserError)  # `main` prints it as one line
  message = str(info.value)
  assert "\n" not in message and "'" not in message and '"' not in message
  assert message.startswith(f"the checkpoint {tmp_path}/1 does not fit this config: ")
  assert expected in info.value.detail and expected in message
  assert message.count("use the config it was written with") == 1
  assert len(message) <= len(str(tmp_path)) * 2 + 300
  # A mismatch is a mismatch, never an unreadable step to skip.
  assert ckpts.all_steps() == [1] and not os.path.exists(f"{tmp_path}/1.unreadable")


def test_the_stage_messages_of_a_mismatch_give_their_advice_once(tmp_path):
  # Resuming a stage with another config's shapes (the paper-analysis case: a denoiser
  # kernel 512x128 against 256x128).
  run_dir = tmp_path / "train_1shot"
  with Checkpoints(str(run_dir / "checkpoints")) as ckpts:
    ckpts.save(20, {"params": {"kernel": jnp.zeros((512, 128))}, "step": 20})
  with Checkpoints(str(run_dir / "checkpoints")) as ckpts:
    with pytest.raises(TrainingError) as info:
      training_loop.restore_latest(
          ckpts, {"params": {"kernel": jnp.zeros((256, 128))}, "step": 0}, {}, str(run_dir),
          "train 1-shot")
  message = str(info.value)
  assert message == (
      f"the checkpoint {run_dir}/checkpoints/20 does not fit the config: params/kernel has "
      "shape (512, 128) in the checkpoint and (256, 128) in this config; use the config it was "
      f"written with, or move {run_dir} aside to retrain this stage")


# ----------------------------------------------------------------------------- any layout

def _layout_config():
  from tiny_pipeline import load_config  # pylint: disable=g-import-not-at-top
  config = load_config("glyphs_conv4")
  config.denoiser.hidden_dims = (32, 16)
  return config


_IMAGE_SHAPE, _FEATURE_DIM, _NUM_BASE = (16, 16, 1), 64, 10
_MARK = 0.25  # the value of every saved parameter: no initialisation gives it


def _marked(tree):
  return jax.tree.map(lambda a: jnp.full_like(a, _MARK), tree)


def _assert_marked(tree, on_this_layout):
  leaves = jax.tree.leaves(tree)
  assert leaves
  for leaf in leaves:
    np.testing.assert_array_equal(on_this_layout(leaf), _MARK)


def write_layouts(root: str, stages: bool) -> None:
  """Checkpoints written on this process's layout: a plain tree with replicated, sharded, host
  and scalar leaves (steps 1, 2); with `stages`, also a workdir holding a pretrained backbone
  and a 1-shot denoiser (best and latest) whose parameters are all `_MARK`.

  Runs in a subprocess with 8 devices or as one of 2 processes, or in the tests' own.
  """
  from metadiff_jax import mesh  # pylint: disable=g-import-not-at-top
  from metadiff_jax import method, pretraining  # pylint: disable=g-import-not-at-top
  from metadiff_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  x = np.arange(64.0, dtype=np.float32).reshape(16, 4)
  replicated = mesh.replicate(x)
  sharded = jax.jit(lambda a: a, out_shardings=mesh.sharded())(replicated)
  with Checkpoints(os.path.join(root, "plain"), max_to_keep=None) as ckpts:
    for step in (1, 2):
      ckpts.save(step, {"replicated": replicated * step, "sharded": sharded * step,
                        "host": np.arange(3) * step, "count": 7 * step},
                 {"devices": jax.device_count(), "processes": jax.process_count()})
  if not stages:
    return
  config = _layout_config()
  workdir = os.path.join(root, "workdir")
  state = pretraining.initial_state(config, _IMAGE_SHAPE, 64, _NUM_BASE)
  with Checkpoints(os.path.join(workdir, "pretrain", "best")) as ckpts:
    ckpts.save(5, state.replace(params=_marked(state.params)),
               {"image_shape": list(_IMAGE_SHAPE), "epoch": 1})
  state = method.MetaDiff.from_config(config, _FEATURE_DIM).init(1)
  state = state.replace(params=_marked(state.params), ema_params=_marked(state.ema_params))
  run_dir = workdir_lib.train_dir(workdir, 1)
  with Checkpoints(os.path.join(run_dir, "best")) as ckpts:
    ckpts.save(3, state, {"val_accuracy": 0.5})
  with Checkpoints(os.path.join(run_dir, "checkpoints")) as ckpts:
    ckpts.save(3, state, {"best_val_accuracy": 0.5, "best_step": 3})


def read_layouts(root: str, stages: bool) -> dict:
  """Reads what `write_layouts` wrote on this process's layout and checks the values: the
  plain tree with and without a template; with `stages`, through every reader of the
  package (predict, the importer, eval and a resumed stage). Returns the plain metadata."""
  from metadiff_jax import import_torch, mesh, predict  # pylint: disable=g-import-not-at-top
  from metadiff_jax import embedding  # pylint: disable=g-import-not-at-top
  from metadiff_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  x = np.arange(64.0, dtype=np.float32).reshape(16, 4)
  here = set(jax.devices())

  def on_this_layout(array):
    assert isinstance(array, jax.Array) and array.sharding.device_set <= here
    return np.asarray(array)

  # Without a template (predict's and the importer's reader).
  tree, meta = checkpoint.read_latest(os.path.join(root, "plain"))
  np.testing.assert_array_equal(on_this_layout(tree["replicated"]), 2 * x)
  np.testing.assert_array_equal(on_this_layout(tree["sharded"]), 2 * x)
  assert isinstance(tree["host"], np.ndarray) and list(tree["host"]) == [0, 2, 4]
  assert tree["count"] == 14 and isinstance(tree["count"], int)
  # With a template: its shardings, and the current mesh's where it names none.
  with Checkpoints(os.path.join(root, "plain")) as ckpts:
    template = {"replicated": jax.ShapeDtypeStruct((16, 4), jnp.float32),
                "sharded": jax.device_put(np.zeros((16, 4), np.float32), mesh.sharded()),
                "host": np.zeros(3, np.int64), "count": 0}
    restored, _ = ckpts.restore(template, step=1)
  np.testing.assert_array_equal(on_this_layout(restored["replicated"]), x)
  assert restored["sharded"].sharding == mesh.sharded()
  np.testing.assert_array_equal(on_this_layout(restored["sharded"]), x)
  if not stages:
    return meta

  config = _layout_config()
  workdir = os.path.join(root, "workdir")
  variables, image_shape = predict._load_backbone(  # pylint: disable=protected-access
      config, workdir, embedding.backbone(config))
  assert tuple(image_shape) == _IMAGE_SHAPE
  _assert_marked(variables["params"], on_this_layout)
  existing = import_torch._existing(workdir)  # pylint: disable=protected-access
  assert existing["backbone"][1]["image_shape"] == list(_IMAGE_SHAPE)
  _assert_marked(existing["heads"][1], on_this_layout)
  _, state, initial, _ = workdir_lib.load_denoiser(config, workdir, 1, _FEATURE_DIM)
  _assert_marked(state.ema_params, on_this_layout)
  run_dir = workdir_lib.train_dir(workdir, 1)
  with Checkpoints(os.path.join(run_dir, "checkpoints")) as ckpts:
    resumed, resumed_meta = training_loop.restore_latest(ckpts, initial, {}, run_dir, "resume")
  assert int(resumed.step) == 0 and resumed_meta == {"best_val_accuracy": 0.5, "best_step": 3}
  _assert_marked(resumed.params, on_this_layout)
  return meta


_LAYOUT_CHILD = textwrap.dedent("""
    import sys
    root, what, stages = sys.argv[1], sys.argv[2], sys.argv[3] == "stages"
    if what.startswith("process"):  # process:<id>:<port>, one of 2
      from metadiff_jax import mesh
      _, pid, port = what.split(":")
      mesh.initialize_distributed(f"127.0.0.1:{port}", 2, int(pid))
    sys.path.insert(0, sys.argv[4])
    import test_checkpoint
    if what == "read":
      print("read", test_checkpoint.read_layouts(root, stages))
    else:
      test_checkpoint.write_layouts(root, stages)
""")


def _layout_child(root, what: str, devices: int, stages: bool = False) -> subprocess.Popen:
  env = {"XLA_FLAGS": xla_flags(devices)}
  log = open(os.path.join(root, f"{what.replace(':', '_')}.log"), "w+")
  child = subprocess.Popen(
      [sys.executable, "-c", _LAYOUT_CHILD, str(root), what, "stages" if stages else "plain",
       str(REPO / "tests")], env=_child_env(**env), cwd=REPO, stdout=log,
      stderr=subprocess.STDOUT, text=True)
  child.log = log
  return child


def _finish(child: subprocess.Popen) -> str:
  try:
    child.wait(timeout=600)
  finally:
    if child.poll() is None:
      child.kill()
      child.wait(timeout=30)
  child.log.seek(0)
  output = child.log.read()
  child.log.close()
  assert child.returncode == 0, output[-3000:]
  return output


@pytest.mark.slow  # a denoiser initialised in both processes (about 20 s of CPU)
def test_a_checkpoint_of_eight_devices_reads_on_one_in_every_reader(tmp_path):
  _finish(_layout_child(tmp_path, "write", devices=8, stages=True))
  assert read_layouts(str(tmp_path), stages=True) == {"devices": 8, "processes": 1}


def test_a_checkpoint_of_two_processes_reads_in_one(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  children = [_layout_child(tmp_path, f"process:{pid}:{port}", devices=2) for pid in (0, 1)]
  for child in children:
    _finish(child)
  assert read_layouts(str(tmp_path), stages=False) == {"devices": 4, "processes": 2}


def test_a_checkpoint_of_one_device_reads_on_eight(tmp_path):
  write_layouts(str(tmp_path), stages=False)
  output = _finish(_layout_child(tmp_path, "read", devices=8))
  assert "read {'devices': 1, 'processes': 1}" in output


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


# ----------------------------------------------------------------------------- unreadable steps

def _damage(step_dir: pathlib.Path, how: str) -> None:
  """Damages a committed step as a full disk or a bad copy would."""
  if how == "truncated data":
    data = max((p for p in (step_dir / "state" / "d").iterdir()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  elif how == "garbled index":
    index = step_dir / "state" / "_METADATA"
    index.write_bytes(bytes(b ^ 0x5A for b in index.read_bytes()))
  elif how == "empty metadata":
    (step_dir / "metadata" / "metadata").write_bytes(b"")
  elif how == "missing manifest":
    (step_dir / "state" / "manifest.ocdbt").unlink()
  elif how == "garbled step metadata, truncated manifest":  # Orbax quotes the first whole
    path = step_dir / "_CHECKPOINT_METADATA"
    path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()) * 8)
    path = step_dir / "state" / "manifest.ocdbt"
    path.write_bytes(path.read_bytes()[:50])
  else:
    raise ValueError(how)


def _save_steps(directory: pathlib.Path, steps) -> None:
  with Checkpoints(str(directory), max_to_keep=None) as ckpts:
    for step in steps:
      ckpts.save(step, {"w": jnp.full((256,), float(step)), "step": step}, {"step": step})


_DAMAGES = ["truncated data", "garbled index", "empty metadata", "missing manifest",
            "garbled step metadata, truncated manifest"]


@pytest.mark.parametrize("how", _DAMAGES)
def test_an_unreadable_latest_step_falls_back_to_the_newest_intact_one(tmp_path, caplog, how):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, (20, 30, 40))
  _damage(directory / "40", how)
  ckpts = Checkpoints(str(directory))
  template = {"w": jnp.zeros((256,)), "step": 0}
  with caplog.at_level(logging.WARNING):
    restored, meta = ckpts.restore(template)
  assert meta == {"step": 30} and restored["step"] == 30
  np.testing.assert_array_equal(restored["w"], np.full(256, 30.0))
  # One short line names the step skipped, why, and the step used; nothing else is logged.
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"checkpoint step 40 in {directory} is unreadable (")
  assert lines[0].endswith("; using step 30, the newest intact one")
  assert "\n" not in lines[0] and len(lines[0]) <= len(str(directory)) + 250
  # Every reader falls back alike; the damaged step stays where it is.
  assert ckpts.metadata() == {"step": 30}  # step 40's metadata may be intact: not taken
  assert checkpoint.read_latest(str(directory))[1] == {"step": 30}
  assert (directory / "40").is_dir() and ckpts.all_steps() == [20, 30, 40]
  # The resumed run saves on: the damaged step is set aside, not deleted.
  ckpts.save(35, {"w": jnp.full((256,), 35.0), "step": 35}, {"step": 35})
  assert ckpts.all_steps() == [30, 35]  # and step 20 went as max_to_keep = 2 says
  assert (directory / "40.unreadable").is_dir() and not (directory / "40").exists()
  assert Checkpoints(str(directory)).restore(template)[1] == {"step": 35}


def test_asking_for_an_unreadable_step_is_one_line(tmp_path):
  _save_steps(tmp_path, (1, 2))
  _damage(tmp_path / "1", "truncated data")
  with pytest.raises(checkpoint.UnreadableCheckpointError) as info:
    Checkpoints(str(tmp_path)).restore({"w": jnp.zeros((256,)), "step": 0}, step=1)
  message = str(info.value)
  assert message.startswith(f"no intact checkpoint in {tmp_path}: step 1 is unreadable (step 1:"
                            " its arrays cannot be read: state/d/")
  assert "\n" not in message and len(message) <= 2 * len(str(tmp_path)) + 300
  assert Checkpoints(str(tmp_path)).restore({"w": jnp.zeros((256,)), "step": 0})[1] == {"step": 2}


def test_no_intact_step_is_one_line_naming_the_folder_to_move(tmp_path):
  run_dir = tmp_path / "train_1shot"
  directory = run_dir / "checkpoints"
  _save_steps(directory, (30, 40))
  _damage(directory / "40", "missing manifest")
  _damage(directory / "30", "truncated data")
  with Checkpoints(str(directory)) as ckpts:
    with pytest.raises(checkpoint.UnreadableCheckpointError) as info:
      ckpts.restore_saved()
    assert info.value.reasons.keys() == {40, 30}
    message = str(info.value)
    assert message.startswith(f"no intact checkpoint in {directory}: steps 40, 30 are "
                              "unreadable (step 40: its arrays cannot be read: ")
    assert message.endswith(f"; move the stage folder {run_dir} aside (nothing is deleted) and "
                            "rerun the stage that writes it")
    assert "\n" not in message and len(message) <= 3 * len(str(directory)) + 300
    # Resuming a stage says which folder to move away to retrain it.
    with pytest.raises(TrainingError) as info:
      training_loop.restore_latest(ckpts, {"w": jnp.zeros((256,)), "step": 0}, {},
                                   str(run_dir), "train 1-shot")
  assert str(info.value).startswith(f"no intact checkpoint in {directory}: steps 40, 30 are ")
  assert str(info.value).endswith(f"; move {run_dir} aside to retrain this stage (nothing is "
                                  "deleted)")
  assert sorted(p.name for p in directory.iterdir()) == ["30", "40"]  # nothing deleted


# In a fresh process, whose stderr is seen whole (tensorstore's abandoned reads complete and
# asyncio logs its unretrieved futures after the failing call, some only at exit).
_NOISE_CHILD = textwrap.dedent("""
    import logging, pathlib, sys
    sys.path.insert(0, sys.argv[2])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import test_checkpoint
    from metadiff_jax.checkpoint import Checkpoints
    from metadiff_jax.errors import UserError
    directory = pathlib.Path(sys.argv[1])
    with Checkpoints(str(directory)) as ckpts:  # a train state: many arrays read at once
      ckpts.save(30, test_checkpoint._state(seed=0), {"step": 30})
      ckpts.save(40, test_checkpoint._state(seed=1), {"step": 40})
    test_checkpoint._damage(directory / "40", "garbled step metadata, truncated manifest")
    template = test_checkpoint._state(seed=2, steps=0)
    print("restored step", Checkpoints(str(directory)).restore(template)[1]["step"])
    test_checkpoint._damage(directory / "30", "truncated data")
    try:
      Checkpoints(str(directory)).restore(template)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
""")


def test_an_unreadable_step_leaves_no_traceback_and_no_long_line_on_stderr(tmp_path):
  result = _run_child(_NOISE_CHILD, str(tmp_path / "checkpoints"), str(REPO / "tests"))
  assert result.returncode == 2, result.stderr[-3000:]
  assert "restored step 30" in result.stdout
  lines = result.stderr.strip().splitlines()
  assert "Traceback" not in result.stderr and "Event loop" not in result.stderr, lines
  # Bounded: the folder named at most twice, and 300 characters besides.
  assert all(len(line) <= 2 * len(str(tmp_path)) + 300 for line in lines), max(lines, key=len)
  assert lines[0].startswith("WARNING root: checkpoint step 40 in ")
  assert lines[0].endswith("; using step 30, the newest intact one")
  assert lines[-1].startswith("error: no intact checkpoint in ")
  assert "steps 40, 30 are unreadable" in lines[-1]
  assert len(lines) == 2, lines


# ----------------------------------------------------------------------------- a stopped run

def test_kept_says_which_checkpoint_a_stopped_run_leaves(tmp_path):
  ckpts = Checkpoints(str(tmp_path))
  assert ckpts.kept() == f"no checkpoint was saved before it ({tmp_path} holds none)"
  ckpts.save(20, {"w": jnp.zeros(())})
  assert ckpts.kept() == f"kept the last good checkpoint (step 20) in {tmp_path}"


@pytest.mark.slow  # compiles a pretraining step
def test_a_nan_before_the_first_checkpoint_says_none_was_kept(data_dir, tmp_path):
  from metadiff_jax.stages import pretrain  # pylint: disable=g-import-not-at-top
  from tiny_pipeline import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir, pretrain__learning_rate=1e30, pretrain__epochs=1)
  with pytest.raises(TrainingError) as info:
    pretrain.stage(config, str(tmp_path))
  message = str(info.value)
  assert "step None" not in message
  assert f"no checkpoint was saved before it ({tmp_path}/pretrain/checkpoints holds none)" in \
      message
