"""The analysis stage (Tables 2-4, Figures 4-5): the one command, its files, and Figure 5.

The command runs on the tiny glyph dataset of the pipeline tests with every loop shrunk
(T = 10, a few meta-training steps), so that each code path of the real analysis is taken in
about a minute or two on two CPU cores.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import near_ties
from tiny_pipeline import (TINY_OVERRIDES, assert_written, command_error, episode_scores,
                           finished_run, parse_command, run_tiny)
from metadiff_jax import config_lib, method, schedule, tcunet
from metadiff_jax.stages import analysis

TINY_ANALYSIS = [
    "--config.analysis.episodes=16", "--config.analysis.batch_episodes=8",
    "--config.analysis.inner_steps=2", "--config.analysis.gda_learning_rates=(0.03, 0.3)",
    "--config.analysis.gda_steps=(1, 5)", "--config.analysis.meta_steps=6",
    "--config.analysis.meta_episodes_per_step=2", "--config.analysis.queries=3",
    "--config.analysis.steps_per_call=3", "--config.analysis.log_every_steps=3",
    "--config.analysis.val_every_steps=3", "--config.analysis.val_episodes=8",
    "--config.analysis.denoiser_steps=10", "--config.analysis.memory_inner_steps=(2, 4, 8)",
    "--config.analysis.trajectory_every=2",
    # The eval stage's episodes as the analysis's, in every run on the fixture's workdir:
    # test_metadiff_rows_equal_the_eval_stage runs the eval stage there, and a later run with
    # another eval.episodes would be refused for the eval results it left (docs/WORKDIR.md).
    "--config.eval.episodes=16",
]

FILES = ["table2.md", "table2.json", "table3.md", "table3.json", "table4.md", "table4.json",
         "fig4_memory.png", "fig4_memory.json", "fig4_memory.md", "fig5_convergence.png",
         "fig5_convergence.json", "fig5_convergence.md"]


COMMAND = "paper_analysis.py:dataset=glyphs"

# `analysed`: (workdir, process) where the whole analysis command has run.
analysed_fixture = finished_run("analysed", COMMAND, *TINY_ANALYSIS)


def test_the_command_writes_every_table_and_figure(analysed):
  workdir, proc = analysed
  out = os.path.join(workdir, "analysis")
  assert_written(out, FILES)
  table2 = json.load(open(os.path.join(out, "table2.json")))
  rows = table2["rows"]
  assert set(rows) == {"class_means", "gda", "gda_momentum", "anil", "metalstm", "alfa",
                       "metadiff"}
  for row, by_shot in rows.items():
    r = by_shot["1"]
    assert 0.0 <= r["mean"] <= 1.0 and r["n"] == 16, (row, r)
  # GDA's tuning is recorded, over the whole grid.
  assert len(rows["gda"]["1"]["tuning"]["grid"]) == 4
  assert rows["gda"]["1"]["tuning"]["best"]["learning_rate"] in (0.03, 0.3)
  table4 = json.load(open(os.path.join(out, "table4.json")))["rows"]
  assert table4["linear_metadiff"]["1"]["settings"]["head"] == "linear"
  table3 = json.load(open(os.path.join(out, "table3.json")))["rows"]
  assert table3["cosine_ce"]["1"]["settings"]["gradient"] == "cosine_ce"
  assert table3["no_unet"]["1"]["settings"]["unet"] is False
  # The tables are printed and written as Markdown with the paper's figures beside ours.
  text = open(os.path.join(out, "table2.md")).read()
  assert "(vi) MetaDiff" in text and "64.99 ± 0.77%" in text
  assert "| (vi) MetaDiff |" in proc.stdout


def test_metadiff_rows_equal_the_eval_stage(analysed, data_dir):
  """MetaDiff's row is the eval stage's number: same denoiser, episodes and sampling key."""
  workdir, _ = analysed
  run_tiny(COMMAND, workdir, data_dir, *TINY_ANALYSIS, "--config.stages=('eval',)",
           "--config.eval.episodes=16")
  evaluated = json.load(open(os.path.join(workdir, "eval", "1shot.json")))["metadiff"]
  table2 = json.load(open(os.path.join(workdir, "analysis", "table2.json")))["rows"]
  assert table2["metadiff"]["1"]["mean"] == pytest.approx(evaluated["mean"], abs=1e-9)


def test_figure4_unrolled_memory_grows_and_metadiff_stays_flat(analysed):
  workdir, _ = analysed
  memory = json.load(open(os.path.join(workdir, "analysis", "fig4_memory.json")))
  assert memory["inner_steps"] == [2, 4, 8]
  for name in ("anil", "metalstm", "alfa"):
    mib = memory["mib"][name]
    assert mib[0] < mib[1] < mib[2], (name, mib)
  assert len(set(memory["mib"]["metadiff"])) == 1


def test_figure5_curve_ends_at_the_metadiff_row(analysed, data_dir):
  workdir, _ = analysed
  curves = json.load(open(os.path.join(workdir, "analysis", "fig5_convergence.json")))["curves"]
  curve = curves["1"]
  assert curve["steps"] == list(range(0, 11, 2))  # T = 10, every 2 steps
  table2 = json.load(open(os.path.join(workdir, "analysis", "table2.json")))["rows"]
  # The curve samples the row's weights in another compiled program (one that keeps the
  # intermediate steps), equal to rounding: the accuracies agree up to the queries whose two
  # best scores are closer than that rounding moves them (tests/near_ties.py). The row is the
  # eval stage's (test_metadiff_rows_equal_the_eval_stage), so its scores are computed here.
  config = parse_command(f"--config=configs/{COMMAND}", f"--config.data.data_dir={data_dir}",
                         *TINY_OVERRIDES, *TINY_ANALYSIS)
  computed = episode_scores(config, workdir)
  tol = (near_ties.cosine_perturbation_tolerance(0.0, near_ties.SAMPLER_ROUNDING)
         + near_ties.cosine_rounding_tolerance(computed["features"].shape[1], shots=1))
  near = near_ties.margins(computed["metadiff"]["scores"]) < tol
  assert abs(curve["accuracy"][-1] - table2["metadiff"]["1"]["mean"]) <= near.mean() + 1e-9, (
      curve["accuracy"][-1], table2["metadiff"]["1"]["mean"], int(near.sum()))


def test_a_second_run_reuses_every_result(analysed, data_dir):
  workdir, _ = analysed
  before = {n: open(os.path.join(workdir, "analysis", n)).read()
            for n in FILES if n.endswith(".json")}
  proc = run_tiny(COMMAND, workdir, data_dir, *TINY_ANALYSIS)
  assert "meta-train" not in proc.stderr  # nothing trained again
  for name, text in before.items():
    if name != "fig4_memory.json":  # compiled again (cheap), same numbers expected
      assert open(os.path.join(workdir, "analysis", name)).read() == text, name


def test_the_rows_the_config_names_are_the_rows_computed(analysed, data_dir, tmp_path):
  """`analysis.rows` picks rows: those named are the full run's numbers, the rest "—"."""
  workdir, _ = analysed
  copy = str(tmp_path / "workdir")
  shutil.copytree(workdir, copy, symlinks=True)
  shutil.rmtree(os.path.join(copy, "analysis", "1shot", "gda"), ignore_errors=True)
  for name in ("gda", "gda_momentum", "anil", "metalstm", "alfa"):
    path = os.path.join(copy, "analysis", "1shot", f"{name}.json")
    if os.path.exists(path):
      os.remove(path)  # so that computing one of them again would show
  config = parse_command(f"--config=configs/{COMMAND}", f"--config.data.data_dir={data_dir}",
                         *TINY_OVERRIDES, *TINY_ANALYSIS, "--config.analysis.parts=('table2',)",
                         "--config.analysis.rows=('class_means', 'metadiff')")
  results = analysis.stage(config, copy)
  assert set(results[1]) == {"class_means", "metadiff"}
  full = json.load(open(os.path.join(workdir, "analysis", "table2.json")))["rows"]
  picked = json.load(open(os.path.join(copy, "analysis", "table2.json")))["rows"]
  for row in ("class_means", "metadiff"):
    assert picked[row]["1"]["mean"] == full[row]["1"]["mean"], row
  assert picked["gda"]["1"] is None and picked["alfa"]["1"] is None
  assert not os.path.exists(os.path.join(copy, "analysis", "1shot", "gda.json"))
  assert "| (i) GDA | — |" in open(os.path.join(copy, "analysis", "table2.md")).read()
  # Every row the tables show is one the config can name, and a misspelt one is refused.
  assert {r for _, rows in analysis.TABLES.values() for r, _ in rows} == set(
      config_lib.ANALYSIS_ROWS)
  assert "config.analysis.rows must name some of" in command_error(
      f"--config=configs/{COMMAND}", "--config.analysis.rows=('gdaa',)")


def test_trajectory_last_point_is_the_sampler_output():
  """Figure 5's last point: the same weights and accuracies as the eval stage's sampler."""
  dim, ways, shots, queries, episodes = 8, 3, 2, 4, 5
  model = tcunet.TCUNet(feature_dim=dim, hidden_dims=(6, 4), time_embed_dim=8)
  variables = model.init(jax.random.key(0), jnp.zeros((ways, dim)), 0,
                         jnp.zeros((ways * shots, dim)), jnp.repeat(jnp.arange(ways), shots))
  sched = schedule.linear(num_steps=12)
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(60, dim)), jnp.float32)
  support_idx = jnp.asarray(rng.integers(0, 60, (episodes, ways * shots)), jnp.int32)
  query_idx = jnp.asarray(rng.integers(0, 60, (episodes, ways * queries)), jnp.int32)
  support_labels = jnp.tile(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), shots),
                            (episodes, 1))
  query_labels = jnp.asarray(rng.integers(0, ways, (episodes, ways * queries)), jnp.int32)
  index = jnp.arange(episodes, dtype=jnp.int32)
  key = jax.random.key(3)
  traj = method.trajectory_metrics(model, variables, sched, features, support_idx,
                                   support_labels, query_idx, query_labels, index, key,
                                   ways=ways, every=3)
  acc, loss, w0 = traj["accuracy"], traj["support_loss"], traj["w0"]
  assert acc.shape == loss.shape == (episodes, 5)
  m = method.episode_metrics(model, variables, sched, features, support_idx, support_labels,
                             query_idx, query_labels, index, key, ways)
  # Two compiled programs of one sampler: the same weights up to rounding, so the same
  # accuracies up to the queries whose two best scores nearly tie (tests/near_ties.py).
  sampled = method.episode_scores(model, variables, sched, features, support_idx,
                                  support_labels, query_idx, index, key, ways)["weights"]
  moved = near_ties.relative_errors(w0, sampled)
  assert moved.max() <= near_ties.SAMPLER_ROUNDING, moved.max()
  scores = near_ties.cosine_scores(np.asarray(features)[np.asarray(query_idx)], w0)
  tol = (near_ties.cosine_perturbation_tolerance(0.0, near_ties.SAMPLER_ROUNDING)
         + near_ties.cosine_rounding_tolerance(dim, shots))
  near_ties.assert_accuracy_within_near_ties(acc[:, -1], m["accuracy"],
                                             near_ties.margins(scores) < tol)
  np.testing.assert_allclose(np.asarray(loss[:, -1]), np.asarray(m["support_loss"]),
                             rtol=1e-5)
  # The divergence diagnostic's last point is the eval stage's norm ratio.
  np.testing.assert_allclose(np.asarray(traj["norm"][:, -1] / traj["reference_norm"]),
                             np.asarray(m["norm_ratio"]), rtol=1e-5)
  # Point 0 is w_T itself: the Gaussian start's accuracy, not the sampler's.
  assert np.all(np.isfinite(np.asarray(loss)))
  assert w0.shape == (episodes, ways, dim)
