"""The training loop on a toy state: resume identity, the NaN stop, keeping the best, logs."""

import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import checkpoint, mesh, metrics, training_loop
from metadiff_jax.errors import TrainingError


@flax.struct.dataclass
class Toy:
  step: jax.Array
  w: jax.Array


@functools.partial(jax.jit, static_argnames=("count", "nan_at"))
def _toy_steps(state, count: int, nan_at: int = -1):
  """w <- w / 2 + step + 1, so the result depends on every step before; loss w (NaN from the
  step `nan_at` on)."""
  def one(state, _):
    w = state.w / 2 + state.step + 1
    loss = jnp.where(state.step >= nan_at if nan_at >= 0 else False, jnp.nan, w)
    return Toy(step=state.step + 1, w=w), loss
  return jax.lax.scan(one, state, None, length=count)


def _initial():
  return mesh.replicate(Toy(step=jnp.zeros((), jnp.int32), w=jnp.zeros((), jnp.float32)))


def _run(run_dir, steps, scores=None, nan_at=-1, **schedule):
  """Runs the loop to `steps`; validation scores are scores[step] (default: the step)."""
  calls = []

  def validate(step, state):
    calls.append(step)
    score = (scores or {}).get(step, float(step))
    return training_loop.Validation(score=score, metrics={"val_accuracy": score},
                                    best_metadata={"val_accuracy": score},
                                    best_meta={"best_step": step})

  latest = checkpoint.Checkpoints(os.path.join(run_dir, "checkpoints"), max_to_keep=2)
  best = checkpoint.Checkpoints(os.path.join(run_dir, "best"), max_to_keep=1)
  try:
    result = training_loop.run(
        lambda state, step, count: _toy_steps(state, count, nan_at), _initial(), validate,
        run_dir=str(run_dir), name="toy", latest=latest, best=best,
        schedule=training_loop.Schedule(steps=steps, **schedule),
        meta={"best_val_accuracy": -1.0, "best_step": -1}, loss_name="the toy loss",
        advice="lower it", plot=training_loop.Plot(("loss", "val_accuracy"), "toy"))
    best_step = best.latest_step()
  finally:
    latest.close()
    best.close()
  return result, calls, best_step


def _expected_w(steps):
  w = 0.0
  for s in range(steps):
    w = w / 2 + s + 1
  return np.float32(w)


SCHEDULE = dict(steps_per_call=3, log_every=4, validate_every=6, checkpoint_every=5)


def test_logs_validations_saves_and_the_best(tmp_path):
  scores = {6: 0.7, 12: 0.9, 14: 0.2}
  result, calls, best_step = _run(tmp_path, 14, scores, **SCHEDULE)
  assert result.trained and int(result.state.step) == 14
  assert float(result.state.w) == _expected_w(14)
  # Calls end at 3, 6, 9, 12, 14: a step counts where a call crosses a multiple.
  assert calls == [6, 12, 14]
  assert best_step == 12 and result.meta == {"best_val_accuracy": 0.9, "best_step": 12}
  records = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  losses = [r for r in records if "loss" in r]
  assert [r["step"] for r in losses] == [6, 9, 12, 14]
  # Each logged loss is the mean of the steps since the previous one (loss of step s: w_s).
  ws = [_expected_w(s) for s in range(1, 15)]
  assert losses[0]["loss"] == pytest.approx(np.mean(ws[:6]))
  assert losses[1]["loss"] == pytest.approx(np.mean(ws[6:9]))
  assert [r["val_accuracy"] for r in records if "val_accuracy" in r] == [0.7, 0.9, 0.2]
  assert open(tmp_path / "curves.png", "rb").read(4) == b"\x89PNG"
  with checkpoint.Checkpoints(os.path.join(tmp_path, "checkpoints")) as latest:
    assert latest.all_steps() == [12, 14]


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
  whole, _, _ = _run(tmp_path / "whole", 14, **SCHEDULE)
  first, _, _ = _run(tmp_path / "parts", 8, **SCHEDULE)  # saves at 5 (and 6, 8)
  assert int(first.state.step) == 8
  resumed, calls, _ = _run(tmp_path / "parts", 14, **SCHEDULE)
  assert resumed.trained and calls == [14]  # 8 -> 11 -> 14: crosses 12 at the end
  assert int(resumed.state.step) == 14 and float(resumed.state.w) == float(whole.state.w)
  # Run again: it is done, nothing runs.
  again, calls, _ = _run(tmp_path / "parts", 14, **SCHEDULE)
  assert not again.trained and calls == [] and int(again.state.step) == 14


def test_a_nan_loss_stops_with_one_line_naming_the_step_and_the_kept_checkpoint(tmp_path):
  with pytest.raises(TrainingError) as info:
    _run(tmp_path, 20, nan_at=7, steps_per_call=1, checkpoint_every=4)
  directory = os.path.join(tmp_path, "checkpoints")
  # Step 8 (the 8th, state.step 7) is the first NaN; found at the save of step 8.
  assert str(info.value) == ("the toy loss became nan at step 8; kept the last good checkpoint "
                             f"(step 4) in {directory}; lower it")
  with checkpoint.Checkpoints(directory) as latest:
    assert latest.all_steps() == [4]


def test_validate_first_and_a_run_of_no_steps(tmp_path):
  _, calls, best_step = _run(tmp_path / "first", 3, steps_per_call=3, validate_first=True)
  assert calls == [0, 3] and best_step == 3
  result, calls, best_step = _run(tmp_path / "none", 0)
  assert calls == [0] and best_step == 0 and result.trained
  assert int(result.state.step) == 0
