"""The pipeline on a tiny glyph dataset: each stage, the whole run, resuming, and bad input.

The dataset is 40 glyph classes of 16 x 16 pixels (26 / 6 / 8 classes), the diffusion has
T = 10 steps, and every stage runs a handful of steps, so that the suite stays fast on two
CPU cores while every code path of the real run is taken.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import near_ties
from conftest import CLI_RUN_OVERRIDES, REPO, built_once
from tiny_pipeline import TINY_OVERRIDES, cpu_env, episode_scores, load_config, tiny_config
from metadiff_jax import checkpoint, checks, config_lib, embedding, metrics, pretraining, stages
from metadiff_jax import method as method_lib
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import episodes
from metadiff_jax.data.errors import DataError
from metadiff_jax.errors import ConfigError, StageError, TrainingError, UserError
from metadiff_jax.stages import evaluate, pretrain, prototypes, train


@pytest.fixture(scope="session")
def upstream(cli_run, tmp_path_factory):
  """A workdir where pretrain and prototypes have run, with the features they cached: those of
  conftest's `cli_run`, whose config is `tiny_config`'s for these stages (copied by the tests
  that need it)."""

  def build(path):
    for name in ("pretrain", "prototypes", "features"):
      shutil.copytree(cli_run.workdir / name, os.path.join(path, name))

  return built_once(tmp_path_factory, "upstream", build)


def copy_of(upstream, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(upstream, workdir)
  return workdir


def tree_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def latest_train_state(config, workdir, shots=1):
  base = workdir_lib.pretrained_features(config, workdir, "train", progress=False)
  template = method_lib.MetaDiff.from_config(config, base.features.shape[1]).init(shots)
  with checkpoint.Checkpoints(os.path.join(workdir_lib.train_dir(workdir, shots),
                                           "checkpoints")) as c:
    return c.restore(template)[0]


# ----------------------------------------------------------------------------- each stage

def test_pretrain_keeps_the_best_epoch_and_logs_curves(data_dir, upstream):
  out = os.path.join(upstream, "pretrain")
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  val = [r for r in records if "val_accuracy" in r]
  assert [r["epoch"] for r in val] == [1.0, 2.0]
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  best_epoch = max(val, key=lambda r: r["val_accuracy"])
  with checkpoint.Checkpoints(os.path.join(out, "best")) as best:
    assert best.metadata()["val_accuracy"] == pytest.approx(best_epoch["val_accuracy"])
    assert best.latest_step() == best_epoch["step"]
  assert open(os.path.join(out, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(os.path.join(out, "tensorboard"))


def test_prototypes_are_the_class_means_of_the_cached_base_features(data_dir, upstream):
  config = tiny_config(data_dir)
  base = workdir_lib.pretrained_features(config, upstream, "train", progress=False)
  targets = workdir_lib.load_targets(upstream, base)
  expected = np.stack([base.features[base.labels == c].mean(0) for c in range(26)])
  assert targets.shape == (26, base.features.shape[1])
  np.testing.assert_allclose(targets, expected, rtol=1e-5, atol=1e-5)
  # One augmented pass (the original's choice) gives other, finite targets.
  module, variables = workdir_lib.pretrained_backbone(config, upstream)
  augmented = prototypes.augmented_class_means(config, module, variables,
                                               embedding.load_split(config, "train"), 1)
  assert augmented.shape == targets.shape and np.all(np.isfinite(augmented))
  assert not np.allclose(augmented, targets)


def test_train_and_eval_stages(data_dir, upstream, tmp_path):
  workdir = copy_of(upstream, tmp_path)
  config = tiny_config(data_dir)
  # Earlier tests in the session may have compiled the same shapes (the trained_workdir
  # fixture runs this config's stages): count this stage's compilations from empty caches.
  method_lib.train_steps.clear_cache()
  method_lib.episode_metrics.clear_cache()
  compiled = (method_lib.train_steps._cache_size(), method_lib.episode_metrics._cache_size())
  train.stage(config, workdir)
  # 4 calls of 5 steps compile once; 2 validations of 10 episodes in batches of 8, once.
  assert method_lib.train_steps._cache_size() == compiled[0] + 1
  assert method_lib.episode_metrics._cache_size() == compiled[1] + 1
  out = workdir_lib.train_dir(workdir, 1)
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20]
  assert [r["step"] for r in records if "val_accuracy" in r] == [10, 20]
  state = latest_train_state(config, workdir)
  assert int(state.step) == 20
  # EMA copied outright for 5 steps, then averaged with decay 0.999: close to, not equal to,
  # the parameters.
  assert not tree_equal(state.params, state.ema_params)

  summary = evaluate.stage(config, workdir)
  # One more compilation for the test split's size, shared by the trained and the untrained
  # denoiser and by every batch.
  assert method_lib.episode_metrics._cache_size() == compiled[1] + 2
  result = summary["results"]["1shot"]
  for method in ("metadiff", "untrained", "prototypes"):
    assert result[method]["n"] == 20 and 0 <= result[method]["mean"] <= 1
  assert result["untrained"]["norm_ratio"] > 0
  # The class-mean row, recomputed here from the test features the stage sees, with numpy
  # in float64. The stage scores in float32, so a query whose two best scores are closer than
  # float32 rounding can go either way: the rows agree up to those near-ties
  # (tests/near_ties.py derives the bound).
  test = embedding.diffusion_features(
      config, workdir_lib.pretrained_features(config, workdir, "test", progress=False))
  sampler = episodes.EpisodeSampler(test.labels, 5, 1, 15, config.seed, "test")
  eps = sampler.batch(0, 20)
  support, query = test.features[eps.support], test.features[eps.query]
  protos = np.stack([support[eps.support_labels == k].reshape(20, -1, support.shape[-1])
                     .mean(1) for k in range(5)], axis=1)
  scores = near_ties.cosine_scores(query, protos)
  accs = np.mean(scores.argmax(-1) == eps.query_labels, axis=-1)
  tol = near_ties.cosine_rounding_tolerance(test.features.shape[1], shots=1)
  near_ties.assert_within_near_ties(result["prototypes"], metrics.summarize(accs),
                                    near_ties.margins(scores) < tol, "class means")
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["results"]["1shot"]["metadiff"] == result["metadiff"]
  md = open(os.path.join(workdir, "results.md")).read()
  assert "MetaDiff (trained TCUNet, EMA)" in md and "Class-mean prototypes" in md
  assert "](train_1shot/curves.png)" in md and "](pretrain/curves.png)" in md

  # Everything is done: a second run skips every stage and reports the same numbers.
  mtime = os.path.getmtime(os.path.join(out, "checkpoints"))
  stages.run(config, workdir)
  assert os.path.getmtime(os.path.join(out, "checkpoints")) == mtime
  again = json.load(open(os.path.join(workdir, "results.json")))
  assert again["results"] == saved["results"]


# ----------------------------------------------------------------------------- the command

def test_the_whole_pipeline_from_the_command_line(cli_run, data_dir, tmp_path):
  workdir = cli_run.workdir  # conftest's: the tiny pipeline's command, exit status 0
  assert "| MetaDiff (trained TCUNet, EMA) |" in cli_run.stdout
  assert "| Class-mean prototypes (ProtoNet-style) |" in cli_run.stdout
  for path in ("config.json", "results.json", "results.md", "pretrain/best",
               "prototypes/targets.npz", "train_1shot/best", "train_1shot/curves.png",
               "eval/1shot.json"):
    assert (workdir / path).exists(), path
  # The log shows progress with a rate and an ETA.
  assert "step/s, ETA" in cli_run.stderr

  # The accuracy-versus-steps measurement runs on the finished run: respaced with K = T it is
  # the eval stage's MetaDiff accuracy, on the same episodes and starting noise.
  out = tmp_path / "steps.json"
  bench = subprocess.run(
      [sys.executable, "benchmarks/accuracy_vs_steps.py", "--config", "configs/glyphs_conv4.py",
       "--workdir", str(workdir), "--steps", "1,5,10", "--every", "5", "--episodes", "20",
       "--batch_episodes", "8", "--out", str(out), f"--override=data.data_dir={data_dir}"] + [
           "--override=" + o[len("--config."):] for o in (*TINY_OVERRIDES, *CLI_RUN_OVERRIDES)],
      cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
  assert bench.returncode == 0, bench.stderr[-3000:]
  steps = json.loads(out.read_text())
  results = json.loads((workdir / "results.json").read_text())["results"]["1shot"]
  assert [r["num_sampling_steps"] for r in steps["respaced"]] == [1, 5, 10]
  assert steps["respaced"][-1]["mean"] == pytest.approx(results["metadiff"]["mean"], abs=1e-9)
  assert [t["steps_taken"] for t in steps["trajectory"]] == [0, 5, 10]
  # The trajectory's last point samples the same weights in another compiled program (one
  # that keeps the intermediate steps), equal to rounding: the accuracies agree up to the
  # queries whose two best scores are closer than that rounding moves them.
  computed = episode_scores(tiny_config(data_dir), workdir)
  tol = (near_ties.cosine_perturbation_tolerance(0.0, near_ties.SAMPLER_ROUNDING)
         + near_ties.cosine_rounding_tolerance(computed["features"].shape[1], shots=1))
  near = near_ties.margins(computed["metadiff"]["scores"]) < tol
  assert abs(steps["trajectory"][-1]["accuracy"] - results["metadiff"]["mean"]) <= (
      near.mean() + 1e-9), (steps["trajectory"][-1], results["metadiff"], int(near.sum()))
  assert out.with_suffix(".png").exists() and out.with_suffix(".md").exists()


def test_presets_and_the_locked_config():
  one = load_config("glyphs_conv4", "shot=1")
  assert tuple(one.train.shots) == (1,) and config_lib.eval_shots(one) == (1,)
  assert tuple(load_config("glyphs_conv4").train.shots) == (1, 5)
  with pytest.raises(ConfigError, match="unknown config preset 'way'"):
    load_config("glyphs_conv4", "way=3")
  with pytest.raises(AttributeError):
    one.train.stpes = 3
  for name in ("glyphs_conv4", "miniimagenet_resnet12", "tieredimagenet_resnet12",
               "miniimagenet_conv4", "cifar_fs_resnet12", "fc100_resnet12", "image_folder"):
    config = load_config(name)
    checks.check(config)
    assert config.diffusion.num_steps == 1000 and config.train.learning_rate == 1e-4
  paper = load_config("miniimagenet_resnet12")
  assert paper.train.steps == 300_000 and paper.train.episodes_per_step == 8
  assert (paper.pretrain.learning_rate, paper.pretrain.momentum, paper.pretrain.weight_decay,
          paper.pretrain.batch_size, paper.pretrain.epochs) == (0.1, 0.9, 5e-4, 128, 100)


# ----------------------------------------------------------------------------- resuming

def test_resumed_training_equals_an_uninterrupted_run(data_dir, upstream, tmp_path):
  config = tiny_config(data_dir)
  whole = copy_of(upstream, tmp_path / "whole")
  train.stage(config, whole)
  parts = copy_of(upstream, tmp_path / "parts")
  train.stage(tiny_config(data_dir, train__steps=10), parts)
  train.stage(config, parts)
  a, b = latest_train_state(config, whole), latest_train_state(config, parts)
  assert int(a.step) == int(b.step) == 20
  assert tree_equal(a.params, b.params) and tree_equal(a.ema_params, b.ema_params)
  assert tree_equal(a.opt_state, b.opt_state)


def test_resumed_pretraining_equals_an_uninterrupted_run(data_dir, upstream, tmp_path):
  config = tiny_config(data_dir)
  parts = str(tmp_path / "parts")
  pretrain.stage(tiny_config(data_dir, pretrain__epochs=1), parts)
  pretrain.stage(config, parts)
  template = pretraining.initial_state(config)
  states = []
  for workdir in (upstream, parts):
    with checkpoint.Checkpoints(os.path.join(workdir, "pretrain", "checkpoints")) as c:
      states.append(c.restore(template)[0])
  assert int(states[0].step) == int(states[1].step) == 32
  assert tree_equal(states[0].params, states[1].params)
  assert tree_equal(states[0].batch_stats, states[1].batch_stats)


KILLED_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_pipeline import tiny_config
from metadiff_jax.stages import train
config = tiny_config({data_dir!r}, train__steps=200, train__checkpoint_every_steps=10,
                     train__val_every_steps=1000)
train.stage(config, {workdir!r})
"""


def test_a_run_killed_by_sigkill_resumes_to_the_same_parameters(data_dir, upstream, tmp_path):
  killed = copy_of(upstream, tmp_path / "killed")
  script = KILLED_CHILD.format(tests=str(REPO / "tests"), data_dir=data_dir, workdir=killed)
  child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  ckpts = os.path.join(workdir_lib.train_dir(killed, 1), "checkpoints")
  deadline = time.time() + 240
  try:
    while time.time() < deadline and child.poll() is None:
      steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
      if steps and max(steps) >= 20:
        child.send_signal(signal.SIGKILL)
        break
      time.sleep(0.05)
    child.wait(timeout=60)
  finally:
    if child.poll() is None:
      child.kill()
  assert child.returncode == -signal.SIGKILL, child.stderr.read()[-2000:]
  config = tiny_config(data_dir, train__steps=200, train__checkpoint_every_steps=10,
                       train__val_every_steps=1000)
  with checkpoint.Checkpoints(ckpts) as c:
    assert c.latest_step() < 200  # it was killed mid-run
  train.stage(config, killed)
  whole = copy_of(upstream, tmp_path / "whole")
  train.stage(config, whole)
  a, b = latest_train_state(config, whole), latest_train_state(config, killed)
  assert int(a.step) == int(b.step) == 200
  assert tree_equal(a.params, b.params) and tree_equal(a.ema_params, b.ema_params)


# ----------------------------------------------------------------------------- bad input

def test_a_dataset_that_is_not_built_names_the_build_command(tmp_path):
  config = tiny_config(str(tmp_path / "empty"))
  with pytest.raises(DataError, match="python -m metadiff_jax.data build glyphs"):
    stages.run(config, str(tmp_path / "run"))


def test_an_unwritable_workdir(data_dir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(StageError, match="cannot write to workdir"):
    stages.run(tiny_config(data_dir), str(blocker / "run"))


@pytest.mark.parametrize("stage_name", ["prototypes", "train", "eval"])
def test_later_stages_without_a_pretrained_backbone_name_the_stage_to_run(
    data_dir, tmp_path, stage_name):
  config = tiny_config(data_dir)
  config.stages = (stage_name,)
  with pytest.raises(StageError, match="run the pretrain stage"):
    stages.run(config, str(tmp_path / "run"))


def test_train_without_targets_and_eval_without_a_denoiser(data_dir, upstream, tmp_path):
  workdir = copy_of(upstream, tmp_path)
  os.remove(workdir_lib.targets_path(workdir))
  with pytest.raises(StageError, match="run the prototypes stage"):
    train.stage(tiny_config(data_dir), workdir)
  with pytest.raises(StageError, match="run the train stage"):
    evaluate.stage(tiny_config(data_dir), workdir)


def test_episodes_the_split_cannot_supply(data_dir, upstream, tmp_path):
  workdir = copy_of(upstream, tmp_path)
  with pytest.raises(DataError, match="30-way episodes need 30 classes"):
    train.stage(tiny_config(data_dir, train__ways=30), workdir)
  with pytest.raises(DataError, match="need 21 images per class"):
    evaluate.stage(tiny_config(data_dir, eval__queries=20, eval__shots=(1,)), workdir)


def test_a_backbone_checkpoint_that_does_not_fit(data_dir, tmp_path):
  # A ResNet12 state dict with the standard names but half the widths of the configured one.
  rng = np.random.default_rng(0)
  tensors, c_in = {}, 1
  for layer, width in enumerate((32, 64, 128, 256), start=1):
    for conv, (i, o) in enumerate(((c_in, width), (width, width), (width, width)), start=1):
      tensors[f"module.layer{layer}.conv{conv}.weight"] = rng.normal(size=(o, i, 3, 3))
      for p in ("weight", "bias", "running_mean", "running_var"):
        tensors[f"module.layer{layer}.bn{conv}.{p}"] = np.ones(o)
    tensors[f"module.layer{layer}.downsample.0.weight"] = rng.normal(size=(width, c_in, 1, 1))
    for p in ("weight", "bias", "running_mean", "running_var"):
      tensors[f"module.layer{layer}.downsample.1.{p}"] = np.ones(width)
    c_in = width
  path = tmp_path / "backbone.npz"
  np.savez(path, **{k: v.astype(np.float32) for k, v in tensors.items()})
  config = tiny_config(data_dir)
  config.backbone.name = "resnet12"
  config.backbone.checkpoint = str(path)
  config.stages = ("pretrain",)
  with pytest.raises(UserError, match=r"cannot import the backbone .*layer1") as info:
    stages.run(config, str(tmp_path / "run"))
  assert "\n" not in str(info.value)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data_dir, upstream,
                                                                      tmp_path):
  workdir = copy_of(upstream, tmp_path)
  config = tiny_config(data_dir, train__steps=10)
  train.stage(config, workdir)
  good = latest_train_state(config, workdir)
  bad = tiny_config(data_dir, train__steps=20, train__learning_rate=1e30)
  with pytest.raises(TrainingError, match=r"became (nan|inf) at step 1[1-5]; kept the last good "
                                          r"checkpoint \(step 10\)"):
    train.stage(bad, workdir)
  after = latest_train_state(config, workdir)
  assert int(after.step) == 10 and tree_equal(after.params, good.params)
