"""The workdir's guards: the record of how its outputs were made, the lock, and the episode
settings checked against the dataset before the first stage (metadiff_jax/workdir.py)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from tiny_pipeline import cpu_env, tiny_config
from metadiff_jax import config_lib, stages, workdir
from metadiff_jax.data.errors import DataError
from metadiff_jax.errors import ConfigError, StageError

PIPELINE = ("pretrain", "prototypes", "train", "eval")


def snapshot(root):
  """{relative path: bytes} of every file under `root` but the lock file."""
  out = {}
  for where, _, files in os.walk(root):
    for name in files:
      path = os.path.join(where, name)
      if name != workdir.LOCK_FILE:
        with open(path, "rb") as f:
          out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture
def finished(trained_workdir, tmp_path):
  """A copy of the trained tiny workdir (pretrain, prototypes, train 1 and 5 shots, eval)."""
  root = str(tmp_path / "run")
  shutil.copytree(trained_workdir, root)
  return root


# ----------------------------------------------------------------------------- the record

def test_a_changed_learning_rate_is_refused_and_nothing_is_rewritten(finished):
  before = snapshot(finished)
  config = config_lib.load_workdir_config(finished)
  config.train.learning_rate = 0.01
  with pytest.raises(ConfigError) as info:
    stages.run(config, finished)
  message = str(info.value)
  assert "\n" not in message
  assert "train.learning_rate 0.001 -> 0.01" in message
  for name in ("train_1shot", "train_5shot", "eval", "results.json"):
    assert name in message
  assert "pretrain," not in message and "prototypes," not in message  # unaffected
  assert "new --workdir" in message and f"out of {finished}" in message
  assert snapshot(finished) == before  # config.json, results.json, everything: same bytes


def test_the_record_allows_eval_settings_more_steps_and_subsets(trained_workdir):
  """What leaves the record true passes the check on the finished workdir (read only)."""
  recorded = config_lib.load_workdir_config(trained_workdir)

  def check(**changes):
    config = config_lib.load_workdir_config(trained_workdir)
    for name, value in changes.items():
      if "__" in name:
        section, field = name.split("__")
        config[section][field] = value
      else:
        config[name] = value
    workdir.check_record(config, trained_workdir)

  check()
  check(eval__episodes=40, eval__queries=10)  # the eval stage recomputes its results
  check(diffusion__num_sampling_steps=5)  # sampling settings key the eval results too
  check(train__steps=recorded.train.steps + 100)  # the train stage continues
  check(train__steps=recorded.train.steps + 100, stages=("train",))
  check(stages=("eval",))  # a subset of stages
  check(train__shots=(1,), eval__shots=(1,))  # each shot setting has its own folder
  check(train__log_every_steps=7, train__checkpoint_every_steps=3, eval__batch_episodes=4)
  check(data__data_dir="/elsewhere/tensorflow_datasets")  # where the dataset is, not which
  with pytest.raises(ConfigError, match=r"train.steps 200 -> 100; .*train_1shot, train_5shot"):
    check(train__steps=100)  # the denoisers were trained for longer than it says
  with pytest.raises(ConfigError, match=r"continues only in a run whose config.stages includes "
                                        r"train"):
    check(train__steps=400, stages=("eval",))
  # More pretraining changes the features the denoisers were trained on.
  with pytest.raises(ConfigError, match=r"pretrain.epochs 10 -> 12; .* train_1shot, "
                                        r"train_5shot would hold"):
    check(pretrain__epochs=12)
  with pytest.raises(ConfigError, match=r"eval.ways 5 -> 3; .* the existing eval"):
    check(eval__ways=3, stages=("train",))  # the eval stage does not run to redo its results
  with pytest.raises(ConfigError, match=r"denoiser.hidden_dims \(32, 16\) -> \(16, 8\)"):
    check(denoiser__hidden_dims=(16, 8))


def test_an_eval_only_change_runs_and_is_recorded(finished):
  config = config_lib.load_workdir_config(finished)
  config.stages = ("eval",)
  config.eval.episodes = 8
  stages.run(config, finished)
  recorded = json.load(open(os.path.join(finished, config_lib.WORKDIR_CONFIG)))
  results = json.load(open(os.path.join(finished, "results.json")))
  assert recorded["eval"]["episodes"] == 8 and results["config"]["eval"]["episodes"] == 8
  assert results["results"]["1shot"]["metadiff"]["n"] == 8


@pytest.mark.slow  # trains (a minute on two loaded cores)
def test_more_steps_continue_training_and_are_recorded(finished):
  from metadiff_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config = config_lib.load_workdir_config(finished)
  config.stages = ("train",)
  config.train.shots = (1,)
  config.train.steps += 5
  stages.run(config, finished)
  with checkpoint.Checkpoints(os.path.join(finished, "train_1shot", "checkpoints")) as store:
    assert store.latest_step() == config.train.steps
  recorded = json.load(open(os.path.join(finished, config_lib.WORKDIR_CONFIG)))
  assert recorded["train"]["steps"] == config.train.steps


def test_record_conflicts_follow_the_stage_chain():
  old = {"seed": 0, "stages": ["pretrain"], "pretrain": {"epochs": 2, "learning_rate": 0.1},
         "prototypes": {"augmented_passes": 0}, "train": {"steps": 20, "learning_rate": 1e-4},
         "eval": {"ways": 5}, "analysis": {"meta_steps": 10}}

  def conflicts(existing, running=PIPELINE, **changes):
    new = json.loads(json.dumps(old))
    for name, value in changes.items():
      section, field = name.split("__")
      new[section][field] = value
    outputs = {s: [s] for s in existing}
    return {f: hit for f, _, _, hit in workdir.record_conflicts(old, new, outputs, running)}

  everything = ("pretrain", "prototypes", "train", "eval", "analysis")
  # A pretrain field concerns every stage after it; one with no outputs yet is free.
  assert conflicts(everything, pretrain__learning_rate=0.2) == {
      "pretrain.learning_rate": list(everything)}
  assert conflicts((), pretrain__learning_rate=0.2) == {}
  # A train field leaves the backbone and the targets alone.
  assert conflicts(everything, train__learning_rate=1e-3) == {
      "train.learning_rate": ["train", "eval", "analysis"]}
  assert conflicts(("pretrain", "prototypes"), train__learning_rate=1e-3) == {}
  # The targets recompute for a new backbone; the denoisers would not.
  assert conflicts(("pretrain", "prototypes"), pretrain__epochs=4) == {}
  assert conflicts(("pretrain", "prototypes", "train"), pretrain__epochs=4) == {
      "pretrain.epochs": ["train"]}
  assert conflicts(("pretrain",), running=("prototypes",), pretrain__epochs=4) == {
      "pretrain.epochs": ["pretrain"]}
  assert conflicts(("pretrain", "prototypes"), prototypes__augmented_passes=1) == {
      "prototypes.augmented_passes": ["prototypes"]}
  # Eval and analysis settings: recomputed where their stage runs.
  assert conflicts(everything, eval__ways=3) == {}
  assert conflicts(everything, running=("train",), eval__ways=3) == {"eval.ways": ["eval"]}
  assert conflicts(everything, running=("analysis",), analysis__meta_steps=20) == {}
  assert conflicts(everything, running=("eval",), analysis__meta_steps=20) == {
      "analysis.meta_steps": ["analysis"]}
  # The stages to run change nothing; the seed, everything.
  new = dict(old, stages=["eval"], seed=1)
  found = workdir.record_conflicts(old, new, {"pretrain": ["pretrain"]}, PIPELINE)
  assert [(f, hit) for f, _, _, hit in found] == [("seed", ["pretrain"])]


def test_a_workdir_without_a_record_or_with_a_damaged_one(data_dir, tmp_path):
  root = str(tmp_path)
  workdir.check_record(tiny_config(data_dir), root)  # a fresh workdir: nothing to compare
  with open(os.path.join(root, config_lib.WORKDIR_CONFIG), "w") as f:
    f.write("{not json")
  with pytest.raises(ConfigError, match="cannot read .*config.json.*restore it"):
    workdir.check_record(tiny_config(data_dir), root)


# ----------------------------------------------------------------------------- the lock

HOLD = ("import sys, time\nfrom metadiff_jax.workdir import Lock\n"
        "Lock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")


def hold_in_subprocess(root):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, root], cwd=REPO, env=cpu_env(),
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_run_stops_at_once_naming_the_holder(data_dir, tmp_path):
  root = str(tmp_path)
  holder = hold_in_subprocess(root)
  try:
    with pytest.raises(StageError) as info:
      stages.run(tiny_config(data_dir), root)
    message = str(info.value)
    assert "\n" not in message and "another run is using the workdir" in message
    assert f"host {socket.gethostname()}, pid {holder.pid}, since " in message
    assert os.listdir(root) == [workdir.LOCK_FILE]  # no config.json, no stage folder
  finally:
    holder.kill()
    holder.wait()


def test_a_killed_holder_never_blocks(tmp_path):
  root = str(tmp_path)
  holder = hold_in_subprocess(root)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  # The dead run's name is still in the file, but the kernel dropped its lock.
  with open(os.path.join(root, workdir.LOCK_FILE)) as f:
    assert json.load(f)["pid"] == holder.pid
  with workdir.Lock(root):
    with open(os.path.join(root, workdir.LOCK_FILE)) as f:
      assert json.load(f)["pid"] == os.getpid()
  assert os.path.getsize(os.path.join(root, workdir.LOCK_FILE)) == 0  # released: no holder


def test_the_lock_is_per_run_and_released_after_it(data_dir, tmp_path):
  root = str(tmp_path)
  with workdir.Lock(root):
    # Another open of the file (another run in this process, e.g. a notebook) conflicts.
    with pytest.raises(StageError, match=f"pid {os.getpid()}"):
      workdir.Lock(root).acquire()
    # The other processes of one multi-process run do not take it: only process 0 does.
    import metadiff_jax.mesh  # pylint: disable=g-import-not-at-top
    original = metadiff_jax.mesh.is_writer
    metadiff_jax.mesh.is_writer = lambda: False
    try:
      with workdir.guard(tiny_config(data_dir), root):
        pass
    finally:
      metadiff_jax.mesh.is_writer = original
  # A refused run (here: impossible episodes) releases the lock on its way out.
  with pytest.raises(DataError):
    stages.run(tiny_config(data_dir, eval__ways=30), root)
  workdir.Lock(root).acquire()


# ----------------------------------------------------------------------------- the episodes

@pytest.mark.parametrize("changes, message", [
    ({"eval__ways": 30},
     r"^config.eval.ways = 30 but the test split of glyphs \(tiny\) has 8 classes; lower "
     r"config.eval.ways to at most 8$"),
    ({"eval__queries": 20, "eval__shots": (1,)},
     r"^the eval stage's test episodes need 21 images per class \(1 shot of config.eval.shots "
     r"\+ 20 queries of config.eval.queries\) but class .* of the test split of glyphs "
     r"\(tiny\) has 20; lower them to at most 20$"),
    ({"train__ways": 7}, r"^config.train.ways = 7 but the val split of glyphs \(tiny\) has 6"),
    ({"pretrain__val_ways": 7}, r"^config.pretrain.val_ways = 7 but the val split"),
    ({"pretrain__val_queries": 25}, r"pretrain stage's validation episodes need 26 images"),
    ({"train__shots": (1, 21)}, r"train stage's training episodes need 21 images per class "
                                r"\(21 shots of config.train.shots\) but .*; lower it to at "
                                r"most 20$"),
])
def test_impossible_episodes_stop_the_run_before_any_stage(data_dir, tmp_path, changes,
                                                           message):
  root = str(tmp_path / "run")
  with pytest.raises(DataError, match=message) as info:
    stages.run(tiny_config(data_dir, **changes), root)
  assert "\n" not in str(info.value)
  assert os.listdir(root) == [workdir.LOCK_FILE]  # before any stage folder, and config.json


def test_every_configured_stage_has_its_episodes_checked(data_dir):
  config = tiny_config(data_dir)
  config.stages = ("pretrain", "prototypes", "train", "eval", "analysis", "stability")
  config.analysis.queries = 30
  with pytest.raises(DataError, match=r"analysis stage's meta-training episodes need 31 "
                                      r"images per class \(1 shot of config.\w+.shots \+ 30 "
                                      r"queries of config.analysis.queries\)"):
    workdir.check_episodes(config)
  seen = {(s[1], s[2], s[6]) for s in workdir.episode_settings(config)}
  assert ("val", "pretrain.val_ways", "pretrain.val_queries") in seen
  assert ("train", "train.ways", None) in seen and ("test", "eval.ways", "eval.queries") in seen
  config.stages = ("eval",)  # a stage subset checks only what it draws
  assert {s[1] for s in workdir.episode_settings(config)} == {"test"}
  config.backbone.checkpoint = "imported.pth"  # no validation when the backbone is imported
  config.stages = ("pretrain",)
  assert workdir.episode_settings(config) == []


@pytest.mark.parametrize("study, dataset, pipeline", [
    ("paper_analysis", "glyphs", "glyphs_conv4"), ("stability", "glyphs", "glyphs_conv4"),
    ("stability", "textures", "textures_conv4")])
def test_the_readme_studies_may_follow_the_demo_in_its_workdir(dataset, pipeline, study):
  # The README runs the analysis and the stability study on the demo's workdir: their configs
  # may differ from the demo's only in fields that concern their own stage.
  from tiny_pipeline import load_config  # pylint: disable=g-import-not-at-top
  demo = workdir.as_json(load_config(pipeline))
  config = load_config(study, f"dataset={dataset}")
  everything = {s: [s] for s in (*PIPELINE, "analysis", "stability")}
  found = workdir.record_conflicts(demo, workdir.as_json(config), everything,
                                   config_lib.stages_of(config))
  assert found == []
