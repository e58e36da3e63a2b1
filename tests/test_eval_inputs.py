"""The eval stage's inputs: non-finite features, targets and denoisers stop it with one line,
a diverged sampler is reported as such, and config.eval.checkpoint picks the denoiser."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import checkpoint, checks, config_lib, embedding, method
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import features
from metadiff_jax.data.errors import DataError
from metadiff_jax.errors import ConfigError, StageError, UserError
from metadiff_jax.stages import evaluate
from tiny_pipeline import tiny_config


# conftest's trained_workdir: 1- and 5-shot denoisers of 200 steps, checkpointed and validated
# every 100 steps, so that train_<K>shot/checkpoints keeps steps 100 and 200.
TRAINED = dict(pretrain__epochs=10, pretrain__lr_decay_epochs=(9,), train__shots=(1, 5),
               train__steps=200, train__learning_rate=1e-3, train__steps_per_call=50,
               train__val_every_steps=100, train__checkpoint_every_steps=100,
               train__ema_start_step=100)


def _config(data_dir, **sections):
  # Its 1-shot denoiser only, and no noise-error diagnostic: neither is what these tests look
  # at, and each would double their time.
  return tiny_config(data_dir, **{**TRAINED, "eval__shots": (1,),
                                  "eval__diagnostic_episodes": 0, **sections})


@pytest.fixture
def workdir(trained_workdir, tmp_path):
  """A copy of the session's trained workdir, free to damage."""
  path = str(tmp_path / "run")
  shutil.copytree(trained_workdir, path)
  return path


def _evaluate(config, workdir):
  checks.check(config)
  return evaluate.stage(config, workdir)


def _one_line(err) -> str:
  message = str(err.value)
  assert "\n" not in message and isinstance(err.value, UserError)
  return message


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _kept(workdir):
  return workdir_lib.kept_steps(workdir, 1)


# ----------------------------------------------------------------------------- non-finite inputs

def test_nan_in_a_cached_feature_file_stops_eval_and_keeps_the_results(data_dir, workdir):
  config = _config(data_dir)
  results = os.path.join(workdir, "results.json")
  before = _read(results)
  [path] = glob.glob(os.path.join(workdir, "features", "*-test-*.npz"))
  with np.load(path) as f:
    feats, labels = f["features"].copy(), f["labels"]
  feats[[3, 7]] = np.nan
  feats[11, 0] = np.inf
  np.savez(path, features=feats, labels=labels)
  with pytest.raises(DataError) as err:
    _evaluate(config, workdir)
  message = _one_line(err)
  assert path in message and f"3 of {len(feats)} rows" in message
  assert "delete that file" in message and "pretrain" in message
  assert _read(results) == before


def test_a_backbone_that_produces_nan_stops_eval_and_caches_nothing(data_dir, workdir,
                                                                    monkeypatch):
  config = _config(data_dir)
  before = _read(os.path.join(workdir, "results.json"))
  for path in glob.glob(os.path.join(workdir, "features", "*-test-*.npz")):
    os.remove(path)

  def nan_embed_fn(module, aug):
    del aug
    return jax.jit(lambda variables, images: jnp.full((images.shape[0], 8), jnp.nan))

  monkeypatch.setattr(embedding, "embed_fn", nan_embed_fn)
  with pytest.raises(DataError) as err:
    _evaluate(config, workdir)
  message = _one_line(err)
  assert "NaN or infinite features" in message and "the test split" in message
  assert "pretrain" in message
  assert not glob.glob(os.path.join(workdir, "features", "*-test-*.npz"))
  assert _read(os.path.join(workdir, "results.json")) == before


def test_non_finite_computed_features_are_never_cached(tmp_path):
  def compute():
    return np.array([[1.0, 2.0], [np.inf, 0.0]], np.float32), np.array([0, 1])

  with pytest.raises(DataError, match=r"1 of 2 rows \(nothing was cached\)"):
    features.cached_features(str(tmp_path), "key", compute, 2)
  assert not os.path.exists(tmp_path / "features" / "key.npz")


def test_nan_in_the_diffusion_targets_stops_with_one_line(data_dir, workdir):
  config = _config(data_dir)
  base = workdir_lib.pretrained_features(config, workdir, "train", progress=False)
  path = workdir_lib.targets_path(workdir)
  with np.load(path) as f:
    saved = dict(f)
  np.testing.assert_array_equal(workdir_lib.load_targets(workdir, base), saved["targets"])
  saved["targets"][2, 5] = np.nan
  np.savez(path, **saved)
  with pytest.raises(StageError) as err:
    workdir_lib.load_targets(workdir, base)
  message = _one_line(err)
  assert path in message and "1 of" in message and "rerun the prototypes stage" in message


def _save_scaled_step(workdir, data_dir, step, scale):
  """Saves the last 1-shot checkpoint, its parameters times `scale`, as `step`."""
  config = _config(data_dir)
  directory = os.path.join(workdir_lib.train_dir(workdir, 1), "checkpoints")
  dim = workdir_lib.pretrained_features(config, workdir, "test", progress=False).features.shape[1]
  init = method.MetaDiff.from_config(config, dim).init(1)
  with checkpoint.Checkpoints(directory, max_to_keep=None) as store:
    state, meta = store.restore(init)
    scaled = jax.tree_util.tree_map(lambda p: p * scale, state.ema_params)
    store.save(step, state.replace(step=step, ema_params=scaled), meta)


def test_a_denoiser_with_nan_parameters_is_refused(data_dir, workdir):
  before = _read(os.path.join(workdir, "results.json"))
  _save_scaled_step(workdir, data_dir, 250, np.nan)
  with pytest.raises(StageError) as err:
    _evaluate(_config(data_dir, eval__checkpoint="last"), workdir)
  message = _one_line(err)
  assert "checkpoints/250" in message and "NaN or infinite parameters" in message
  assert _read(os.path.join(workdir, "results.json")) == before


def test_a_diverged_sampler_is_reported_not_scored_as_chance(data_dir, workdir):
  # Finite parameters so large that every sampled prototype overflows: a diverged denoiser.
  _save_scaled_step(workdir, data_dir, 250, 1e30)
  summary = _evaluate(_config(data_dir, eval__checkpoint="last"), workdir)
  r = summary["results"]["1shot"]
  assert r["checkpoint"]["step"] == 250
  assert r["metadiff"]["diverged"] == r["metadiff"]["n"] == 20
  assert r["metadiff_best"]["diverged"] == 0 and r["untrained"]["diverged"] == 0
  md = _read(os.path.join(workdir, "results.md")).decode()
  [row] = [line for line in md.splitlines() if line.startswith("| MetaDiff (trained")]
  assert "| diverged |" in row and "%" not in row
  assert "the sampled weights of 20 of 20 episodes are not finite" in md


def test_partly_diverged_episodes_are_counted():
  run = {"accuracy": np.array([1.0, 0.2, 0.8, 0.2]),
         "norm_ratio": np.array([1.1, np.nan, 0.9, np.inf]),
         "support_loss": np.zeros(4)}
  row = evaluate.row_summary(run)
  assert row["diverged"] == 2 and row["n"] == 4
  assert row["mean"] == pytest.approx(0.55)  # diverged episodes still count, as scored
  assert evaluate.accuracy_cell(row) == "55.00 ± 34.99%"
  assert evaluate.accuracy_cell(dict(row, diverged=4)) == "diverged"


# ----------------------------------------------------------------------------- eval.checkpoint

def test_eval_checkpoint_values_are_checked():
  config = config_lib.base_config()
  assert config.eval.checkpoint == "best" and config_lib.eval_checkpoint(config) == "best"
  for value, expected in (("last", "last"), (300, 300), ("300", 300)):
    config.eval.checkpoint = value
    assert config_lib.eval_checkpoint(config) == expected
  for value in ("worst", -1, 1.5, True):
    config.eval.checkpoint = value
    with pytest.raises(ConfigError, match="config.eval.checkpoint must be 'best', 'last' or a "
                                          "step"):
      config_lib.check(config)
  config.eval.checkpoint = "last"
  config.denoiser.unet = False
  config.stages = ("pretrain", "prototypes", "eval")
  with pytest.raises(ConfigError, match="config.eval.checkpoint = 'last' picks a trained"):
    config_lib.check(config)


def test_eval_reports_the_last_checkpoint_beside_the_best(data_dir, workdir):
  kept = _kept(workdir)
  assert kept["checkpoints"] == [100, 200] and len(kept["best"]) == 1
  summary = _evaluate(_config(data_dir), workdir)
  r = summary["results"]["1shot"]
  assert r["checkpoint"]["step"] == kept["best"][0] and r["checkpoint"]["choice"] == "best"
  assert r["metadiff_last"]["step"] == 200 and "metadiff_best" not in r
  # Another step is sampled with its own parameters (the EMA moves little in 10 tiny steps, so
  # the accuracies may agree; the parameters do not).
  other = r["settings"]["last_checkpoint"]
  assert other[0] == 200 and (other[1] != r["settings"]["denoiser"]) == (kept["best"][0] != 200)
  for name in ("mean", "ci95", "norm_ratio", "diverged"):
    assert name in r["metadiff_last"]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["results"]["1shot"]["metadiff_last"] == r["metadiff_last"]
  md = _read(os.path.join(workdir, "results.md")).decode()
  table = [line for line in md.splitlines() if line.startswith("| ")]
  # The evaluated checkpoint's table reads as before; the last checkpoint's row follows it.
  assert [line.split(" | ")[0] for line in table[1:]] == [
      "| MetaDiff (trained TCUNet, EMA)", "| Same sampler, untrained TCUNet",
      "| Class-mean prototypes (ProtoNet-style)", "| MetaDiff, last checkpoint"]
  assert f"{100 * r['metadiff_last']['mean']:.2f} ± " in table[-1]
  assert (f"MetaDiff row: the best-validated checkpoint (config.eval.checkpoint = 'best'), "
          f"step {kept['best'][0]} (1-shot). MetaDiff, last checkpoint: step 200 (1-shot).") in md

  # The last checkpoint evaluated as the MetaDiff row gives the numbers of that row, and the
  # choice keys the cached result (it is recomputed, not reused).
  last = _evaluate(_config(data_dir, eval__checkpoint="last"), workdir)["results"]["1shot"]
  assert last["checkpoint"] == {**last["checkpoint"], "step": 200, "choice": "last"}
  for name in ("mean", "ci95", "norm_ratio"):
    assert last["metadiff"][name] == pytest.approx(r["metadiff_last"][name], abs=1e-12)
  assert last["metadiff_best"]["step"] == kept["best"][0]
  md = _read(os.path.join(workdir, "results.md")).decode()
  assert "| MetaDiff (trained TCUNet, EMA), last checkpoint |" in md
  assert "| MetaDiff, best-validated checkpoint |" in md


def test_eval_checkpoint_names_a_kept_step(data_dir, workdir):
  summary = _evaluate(_config(data_dir, eval__checkpoint=100), workdir)
  r = summary["results"]["1shot"]
  assert r["checkpoint"]["step"] == 100 and r["checkpoint"]["choice"] == 100
  assert r["metadiff_last"]["step"] == 200
  assert "| MetaDiff (trained TCUNet, EMA), step 100 |" in _read(
      os.path.join(workdir, "results.md")).decode()


def test_eval_checkpoint_of_a_missing_step_lists_the_kept_ones(data_dir, workdir):
  best = _kept(workdir)["best"][0]
  before = _read(os.path.join(workdir, "results.json"))
  with pytest.raises(ConfigError) as err:
    _evaluate(_config(data_dir, eval__checkpoint=150), workdir)
  message = _one_line(err)
  assert "config.eval.checkpoint = 150" in message
  assert f"steps 100, 200 in checkpoints/ and {best} in best/" in message
  assert _read(os.path.join(workdir, "results.json")) == before


def test_a_denoiser_kept_only_in_best_is_evaluated_without_a_last_row(data_dir, workdir):
  # As an imported PyTorch head is kept: train_<K>shot/best and no training checkpoints.
  shutil.rmtree(os.path.join(workdir_lib.train_dir(workdir, 1), "checkpoints"))
  with pytest.raises(ConfigError) as err:
    _evaluate(_config(data_dir, eval__checkpoint="last"), workdir)
  assert "keeps no training checkpoints, only best/" in _one_line(err)
  r = _evaluate(_config(data_dir), workdir)["results"]["1shot"]
  assert "metadiff_last" not in r and "metadiff_best" not in r
  assert "last checkpoint" not in _read(os.path.join(workdir, "results.md")).decode()
