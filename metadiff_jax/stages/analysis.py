"""Stage 5 (optional): the paper's analyses, from the pipeline's features to tables and plots.

    python -m metadiff_jax.main --config configs/paper_analysis.py:dataset=glyphs --workdir DIR

On the same frozen features, base-class episodes and test episodes as the eval stage, for
each shot setting:

- Table 2, meta-optimizers of the prototype classifier (Eq. 11 support loss, 10 x cosine
  queries): (i) GDA (Eq. 4) and (ii) momentum GDA, their learning rate and step count tuned on
  validation episodes; (iii) ANIL, (iv) MetaLSTM, (v) ALFA, meta-trained through their
  unrolled inner loops (`stages.baselines`, `metaopt`); (vi) MetaDiff, the train stage's
  denoiser; and class-mean prototypes as a reference row.
- Table 3, the TCUNet fed (ii) the gradient of the support set's cross-entropy under the
  query classifier's logits instead of Eq. 11's, or (iii) no UNet, the noise estimate being the
  support-loss gradient alone (nothing to train).
- Table 4, the linear classifier head (logits W f + b, cross-entropy support loss) for ALFA
  and for MetaDiff, whose diffusion target of an episode is the linear head fit on all base
  images of its classes.
- Figure 4, the memory of one meta-training step against the number of inner-loop steps for
  the unrolled baselines, beside MetaDiff's diffusion training step (which has no inner loop),
  from XLA's memory analysis of the compiled steps.
- Figure 5, the query accuracy and support loss along MetaDiff's reverse trajectory (every
  `trajectory_every` of the T steps), averaged over the test episodes.

Outputs in WORKDIR/analysis/: table2.md, table3.md, table4.md, fig4_memory.png,
fig5_convergence.png, each with its .json, plus one directory per shot setting holding each
row's result (reused when its settings have not changed), the baselines' checkpoints and
training curves, and the ablation denoisers. MetaDiff's rows use the train stage's denoiser
(trained here if the train stage has not run) and the eval stage's test episodes and sampling
key, so they equal the eval stage's numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import (config_lib, diffusion_training, embedding, evaluator, mesh, metaopt,
                          metrics, rng, tcunet)
from metadiff_jax import method as method_lib
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.data import features
from metadiff_jax.stages import baselines
from metadiff_jax.train_state import DiffusionState, adam_l2, diffusion_step

# The paper's figures (Zhang et al. 2024, Tables 2-4: miniImageNet, 5-way, ResNet12), as
# (1-shot mean, 1-shot CI, 5-shot mean, 5-shot CI) in percent, printed beside ours.
PAPER = {
    "gda": (60.53, 0.86, 72.43, 0.66), "gda_momentum": (62.03, 0.82, 78.28, 0.56),
    "anil": (60.77, 0.82, 77.34, 0.64), "metalstm": (63.56, 0.81, 79.90, 0.59),
    "alfa": (63.92, 0.82, 80.01, 0.61), "metadiff": (64.99, 0.77, 81.21, 0.56),
    "cosine_ce": (62.92, 0.79, 80.92, 0.56), "no_unet": (62.72, 0.84, 80.72, 0.55),
    "linear_alfa": (62.09, 0.84, 78.13, 0.59), "linear_metadiff": (62.72, 0.89, 80.19, 0.57),
}

TABLES = {
    "table2": ("Table 2: meta-optimizers of the prototype classifier", [
        ("class_means", "Class-mean prototypes (reference)"),
        ("gda", "(i) GDA"), ("gda_momentum", "(ii) Momentum GDA"), ("anil", "(iii) ANIL"),
        ("metalstm", "(iv) MetaLSTM"), ("alfa", "(v) ALFA"), ("metadiff", "(vi) MetaDiff")]),
    "table3": ("Table 3: the TCUNet's design", [
        ("metadiff", "(i) TCUNet"), ("cosine_ce", "(ii) Replacing the L2 loss (cosine CE)"),
        ("no_unet", "(iii) w/o UNet")]),
    "table4": ("Table 4: the base learner", [
        ("alfa", "(i) Prototype (ALFA)"), ("metadiff", "(i) Prototype (MetaDiff)"),
        ("linear_alfa", "(ii) Linear (ALFA)"), ("linear_metadiff", "(ii) Linear (MetaDiff)")]),
}

# MetaDiff's ablations: config.denoiser fields, and where their denoisers live.
VARIANTS = {"cosine_ce": {"gradient": "cosine_ce"}, "no_unet": {"unet": False},
            "linear_metadiff": {"head": "linear"}}
UNROLLED = ("anil", "metalstm", "alfa")  # the bi-level baselines (Figure 4)


def analysis_dir(workdir: str) -> str:
  return workdir_lib.stage_dir(workdir, "analysis")


def shots_of(config) -> tuple[int, ...]:
  return tuple(int(k) for k in (config.analysis.shots or config_lib.eval_shots(config)))


def stage(config, workdir: str) -> dict:
  """Runs every analysis; writes the tables, the figures and their JSON."""
  a = config.analysis
  root = os.path.abspath(os.path.expanduser(workdir))
  out = analysis_dir(root)
  base, val, test = (embedding.diffusion_features(config, s) for s in
                     workdir_lib.pretrained_splits(config, root, ("train", "val", "test")))
  targets = workdir_lib.diffusion_targets(config, root, base)
  data = _Data(config, base, val, test, targets)
  parts = set(a.parts)
  results = {}
  for shots in shots_of(config):
    results[shots] = analyse_shot(config, root, shots, data, parts)
  summary = {"dataset": config.data.name, "backbone": config.backbone.name,
             "ways": config.eval.ways, "episodes": _test_episodes(config),
             "feature_dim": int(base.features.shape[1])}
  if mesh.is_writer():
    for name, (title, rows) in TABLES.items():
      if name in parts:
        table = table_markdown(config, title, rows, results)
        _write_text(os.path.join(out, f"{name}.md"), table)
        workdir_lib.write_json(os.path.join(out, f"{name}.json"),
                          {**summary, "rows": {r: {str(k): results[k].get(r) for k in results}
                                               for r, _ in rows}})
        print(table, flush=True)
  if "fig5" in parts and mesh.is_writer():
    curves = {k: results[k]["trajectory"] for k in results}
    workdir_lib.write_json(os.path.join(out, "fig5_convergence.json"),
                           {**summary, "curves": curves})
    _write_text(os.path.join(out, "fig5_convergence.md"), convergence_markdown(curves))
    plot_convergence(curves, os.path.join(out, "fig5_convergence.png"),
                     f"{config.data.name}, {config.eval.ways}-way, test episodes")
  if "fig4" in parts:
    memory = memory_curves(config, data)
    if mesh.is_writer():
      workdir_lib.write_json(os.path.join(out, "fig4_memory.json"), {**summary, **memory})
      _write_text(os.path.join(out, "fig4_memory.md"), memory_markdown(memory))
      plot_memory(memory, os.path.join(out, "fig4_memory.png"))
  return results


class _Data:
  """The features of the three splits, on the devices, with the base split's class table."""

  def __init__(self, config, base, val, test, targets):
    self.base, self.val, self.test, self.targets = base, val, test, targets
    self.dim = int(base.features.shape[1])
    self.table = episodes_lib.class_table(base.labels)
    self.base_dev, self.table_dev = mesh.replicate((base.features, self.table))
    self.val_dev = mesh.replicate(val.features)
    self.test_dev = mesh.replicate(test.features)


def _test_episodes(config) -> int:
  return int(config.analysis.episodes or config.eval.episodes)


def analyse_shot(config, root: str, shots: int, data: _Data, parts: set) -> dict:
  """Every row of the tables (and Figure 5's curve) for K = `shots`: {row: result}."""
  a, e = config.analysis, config.eval
  out = os.path.join(analysis_dir(root), f"{shots}shot")
  test_sampler = episodes_lib.EpisodeSampler(data.test.labels, e.ways, shots, e.queries,
                                             config.seed, "test")
  val_sampler = episodes_lib.EpisodeSampler(data.val.labels, e.ways, shots, e.queries,
                                            config.seed, "val")
  count = _test_episodes(config)
  wanted = set()
  for name, (_, rows) in TABLES.items():
    if name in parts:
      wanted.update(r for r, _ in rows)
  if a.rows is not None:
    wanted &= set(a.rows)
  results = {}
  # The eval stage's sampling key: MetaDiff's rows reproduce its numbers, and every method
  # that starts from Gaussian weights starts episode i from the same draw.
  test_key = rng.key(config, "sampling", 2)
  common_settings = {"shots": shots, "ways": e.ways, "queries": e.queries, "episodes": count,
                     "seed": config.seed, "features": data.test.key}

  def cached(row, settings, compute):
    return workdir_lib.cached_result(os.path.join(out, f"{row}.json"),
                                {**common_settings, **settings}, compute,
                                f"analysis {shots}-shot {row}")

  if "class_means" in wanted:
    results["class_means"] = cached("class_means", {}, lambda: metrics.summarize(
        evaluator.class_mean_accuracy(data.test_dev, test_sampler, count, a.batch_episodes)))
  for row in ("gda", "gda_momentum"):
    if row in wanted:
      results[row] = cached(row, {"grid": _gda_grid(a), "momentum": _momentum(a, row),
                                  "init_std": a.init_std},
                            functools.partial(_gda_row, config, data, row, shots, val_sampler,
                                              test_sampler, count, test_key))
  for row in ("anil", "metalstm", "alfa", "linear_alfa"):
    if row in wanted:
      method = make_method(config, row, data.dim)
      results[row] = _unrolled_row(config, root, row, method, shots, data, val_sampler,
                                   test_sampler, count, test_key, cached)
  # Each MetaDiff row's denoiser, trained if it has not been and loaded once (the MetaDiff
  # row and Figure 5 sample the same one).
  denoiser = functools.cache(lambda row: _metadiff_denoiser(config, root, row, shots, data))
  for row in ("metadiff", "cosine_ce", "no_unet", "linear_metadiff"):
    if row in wanted or (row == "metadiff" and "fig5" in parts):
      results[row] = _metadiff_row(config, row, shots, data, denoiser(row), test_sampler,
                                   count, test_key, cached)
  if "fig5" in parts:
    results["trajectory"] = _trajectory(config, shots, data, denoiser("metadiff"),
                                        test_sampler, count, test_key, cached)
  return results


def _momentum(a, row: str) -> float:
  return float(a.gda_momentum) if row == "gda_momentum" else 0.0


def _gda_grid(a) -> dict:
  return {"learning_rate": tuple(float(x) for x in a.gda_learning_rates),
          "steps": tuple(int(x) for x in a.gda_steps)}


def make_method(config, row: str, feature_dim: int):
  """The `metaopt` method of a table row, with the analysis section's settings."""
  a = config.analysis
  head = "linear" if row.startswith("linear_") else "prototype"
  name = row.replace("linear_", "")
  fields = {"head": head, "ways": config.eval.ways, "feature_dim": feature_dim,
            "steps": int(a.inner_steps)}
  if name == "alfa":  # its random start is GDA's (ANIL and MetaLSTM learn theirs)
    fields["init_std"] = float(a.init_std)
  return metaopt.make(name, **fields)


def _gda_row(config, data, row, shots, val_sampler, test_sampler, count, key) -> dict:
  a = config.analysis
  make = functools.partial(metaopt.make, "gda", head="prototype", ways=config.eval.ways,
                           feature_dim=data.dim, momentum=_momentum(a, row),
                           init_std=float(a.init_std))
  val_key = rng.key(config, "sampling", 1)
  method, tuning = baselines.tune_gda(make, _gda_grid(a), data.val_dev, val_sampler,
                                      a.val_episodes, a.batch_episodes, val_key)
  acc = baselines.run_episodes(method, {}, data.test_dev, test_sampler, count,
                               a.batch_episodes, key, desc=f"test {shots}-shot {row}")
  return {**metrics.summarize(acc), "tuning": tuning}


def _unrolled_row(config, root, row, method, shots, data, val_sampler, test_sampler, count,
                  key, cached) -> dict:
  """Meta-trains (or resumes) a bi-level baseline and tests its best meta-parameters."""
  a = config.analysis
  out = os.path.join(analysis_dir(root), f"{shots}shot", row)
  tag = 100 * UNROLLED.index(row.replace("linear_", "")) + (row.startswith("linear_"))
  keys = {"init": rng.key(config, "analysis", tag, shots, 0),
          "episodes": rng.key(config, "episodes", shots),  # MetaDiff's training episodes
          "train": rng.key(config, "analysis", tag, shots, 1),
          "val": rng.key(config, "sampling", 1)}
  settings = {"method": dataclasses.asdict(method), "meta_steps": a.meta_steps,
              "meta_episodes_per_step": a.meta_episodes_per_step,
              "meta_learning_rate": a.meta_learning_rate, "queries": a.queries,
              "val_episodes": a.val_episodes, "val_every_steps": a.val_every_steps}

  def compute():
    params, meta = baselines.train_method(method, out, a, data.base_dev, data.table_dev,
                                          data.val_dev, val_sampler, keys,
                                          f"{shots}-shot {row}")
    acc = baselines.run_episodes(method, params, data.test_dev, test_sampler, count,
                                 a.batch_episodes, key, desc=f"test {shots}-shot {row}")
    # Its meta-parameters before meta-training, as `train_method` starts from them.
    untrained = baselines.run_episodes(
        method, method.init(keys["init"]), data.test_dev, test_sampler, count,
        a.batch_episodes, key, desc=f"test {shots}-shot {row} untrained")
    return {**metrics.summarize(acc), "untrained": metrics.summarize(untrained),
            "training": meta}

  return cached(row, settings, compute)


def variant_config(config, row: str):
  """The config of a MetaDiff row: the TCUNet variant and its training steps."""
  variant = config.copy_and_resolve_references()
  for field, value in VARIANTS.get(row, {}).items():
    variant.denoiser[field] = value
  d = variant.denoiser
  if d.prediction in tcunet.RESIDUAL_PREDICTIONS and (not d.unet or d.head != "prototype"):
    # A correction to the support class means needs layers and class means: w/o UNet and
    # the linear head predict the noise, as the paper's rows do.
    d.prediction = "eps"
  if row != "metadiff" and config.analysis.denoiser_steps is not None:
    variant.train.steps = int(config.analysis.denoiser_steps)
  return variant


def variant_workdir(root: str, row: str) -> str:
  """Where a MetaDiff row's denoiser lives: the train stage's own for MetaDiff."""
  if row == "metadiff":
    return root
  return os.path.join(analysis_dir(root), "denoisers", row)


def _metadiff_denoiser(config, root, row, shots, data):
  """(variant config, method, EMA variables) of a MetaDiff row, trained first if it has not
  been."""
  variant = variant_config(config, row)
  where = variant_workdir(root, row)
  if variant.denoiser.unet:
    diffusion_training.train_shot(variant, where, shots, data.base, data.targets, data.val)
  metadiff, state, _, _ = workdir_lib.load_denoiser(variant, where, shots, data.dim)
  return variant, metadiff, {"params": state.ema_params}


def _metadiff_row(config, row, shots, data, denoiser, sampler, count, key, cached) -> dict:
  """The MetaDiff row `row`; `denoiser` is its `_metadiff_denoiser`."""
  variant, metadiff, variables = denoiser
  settings = {"denoiser": features.variables_fingerprint(variables),
              "sampler": method_lib.sampler_settings(variant),
              "head": variant.denoiser.head, "gradient": variant.denoiser.gradient,
              "unet": variant.denoiser.unet}

  def compute():
    m = metadiff.evaluate(variables, data.test_dev, sampler, count, config.eval.batch_episodes,
                          key, desc=f"test {shots}-shot {row}")
    return {**metrics.summarize(m["accuracy"]), "norm_ratio": float(np.mean(m["norm_ratio"])),
            "support_loss": float(np.mean(m["support_loss"]))}

  return cached(row, settings, compute)


# ----------------------------------------------------------------------------- Figure 5

def _trajectory(config, shots, data, denoiser, sampler, count, key, cached) -> dict:
  """Figure 5's curve for K shots: mean accuracy and support loss against reverse steps;
  `denoiser` is the MetaDiff row's `_metadiff_denoiser`."""
  variant, metadiff, variables = denoiser
  sched = metadiff.sample_schedule
  every = metadiff.trajectory_every(int(config.analysis.trajectory_every))
  settings = {"denoiser": features.variables_fingerprint(variables), "every": every,
              "sampler": method_lib.sampler_settings(variant)}

  def compute():
    _, m = metadiff.trajectory(variables, data.test_dev, sampler, count,
                               config.eval.batch_episodes, key, every,
                               desc=f"trajectory {shots}-shot", progress=True)
    # float64 means, as `metrics.summarize` takes them: the last point is the MetaDiff row.
    acc = m["accuracy"].astype(np.float64)
    loss = m["support_loss"].astype(np.float64)
    steps = [int(j * every) for j in range(acc.shape[1])]
    return {"steps": steps, "accuracy": acc.mean(0).tolist(),
            "accuracy_ci95": (1.96 * acc.std(0) / np.sqrt(len(acc))).tolist(),
            "support_loss": loss.mean(0).tolist(), "n": len(acc),
            "norm_ratio": m["norm_ratio"].astype(np.float64).mean(0).tolist(),
            "num_sampling_steps": sched.num_steps}

  return cached("trajectory", settings, compute)


def convergence_markdown(curves: dict) -> str:
  """Figure 5 as a table: every 50th point (all of them are in the JSON)."""
  shots = sorted(curves)
  lines = ["# Figure 5: convergence along the reverse trajectory", "",
           "Mean test accuracy, support loss (Eq. 11, mean over the support set) and norm "
           "ratio (mean row norm of the weights over that of the support class means: the "
           "divergence diagnostic) after j reverse steps, from w_T ~ N(0, I) (j = 0) to the "
           "sampler's output (last row).", "",
           "| steps | " + " | ".join(f"{k}-shot accuracy | {k}-shot support loss | "
                                      f"{k}-shot norm ratio" for k in shots) + " |",
           "|---|" + "---|---|---|" * len(shots)]
  steps = curves[shots[0]]["steps"]
  stride = max(1, len(steps) // 20)
  picks = sorted(set(list(range(0, len(steps), stride)) + [len(steps) - 1]))
  for j in picks:
    cells = []
    for k in shots:
      c = curves[k]
      ratio = c.get("norm_ratio")  # absent from results written before it was measured
      cells += [f"{100 * c['accuracy'][j]:.2f}%", f"{c['support_loss'][j]:.4g}",
                "" if ratio is None else f"{ratio[j]:.3g}"]
    lines.append(f"| {steps[j]} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_convergence(curves: dict, path: str, title: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (no pyplot state)
  fig = Figure(figsize=(10, 4), layout="constrained")
  ax_acc, ax_loss = fig.subplots(1, 2)
  for k in sorted(curves):
    c = curves[k]
    ax_acc.plot(c["steps"], 100 * np.asarray(c["accuracy"]), label=f"{k}-shot")
    ax_loss.plot(c["steps"], c["support_loss"], label=f"{k}-shot")
  ax_acc.set(xlabel="reverse steps taken", ylabel="test accuracy (%)", title="accuracy")
  ax_loss.set(xlabel="reverse steps taken", ylabel="support loss (Eq. 11, mean)",
              title="support loss", yscale="log")
  for ax in (ax_acc, ax_loss):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f"MetaDiff convergence: {title}")
  fig.savefig(path, format="png", dpi=110)


# ----------------------------------------------------------------------------- Figure 4

def diffusion_step_memory(model, sched, episodes: int, ways: int, shots: int,
                          weight_dim: int, feature_dim: int) -> int:
  """Bytes of one compiled diffusion training step (the train stage's, state donated)."""
  variables = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((ways, weight_dim)), 0,
      jnp.zeros((ways * shots, feature_dim)), jnp.zeros((ways * shots,), jnp.int32))
  params = variables.get("params", {})
  state = jax.eval_shape(lambda p: DiffusionState.create(
      apply_fn=model.apply, params=p, tx=adam_l2(1e-4, 5e-4), ema_params=p), params)

  def step(state, w0, support, labels, key):
    return diffusion_step(model, state, sched, w0, support, labels, key, 0.999, 0)

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  compiled = jax.jit(step, donate_argnums=0).lower(
      state, f32(episodes, ways, weight_dim), f32(episodes, ways * shots, feature_dim),
      jax.ShapeDtypeStruct((episodes, ways * shots), jnp.int32),
      jax.eval_shape(lambda: jax.random.key(0))).compile()
  return metaopt.compiled_bytes(compiled)


def memory_curves(config, data: _Data) -> dict:
  """Figure 4: MiB of one meta-training step against inner steps, 1-shot episodes."""
  a = config.analysis
  episodes, ways, shots = int(a.meta_episodes_per_step), config.eval.ways, 1
  curves = {}
  for row in UNROLLED:
    mib = []
    for steps in a.memory_inner_steps:
      method = metaopt.make(row, head="prototype", ways=ways, feature_dim=data.dim,
                            steps=int(steps))
      mib.append(metaopt.train_step_memory(method, episodes, shots, int(a.queries)) / 2**20)
    curves[row] = mib
    logging.info("analysis: Figure 4 %s: %s MiB", row, ", ".join(f"{m:.2f}" for m in mib))
  metadiff = method_lib.MetaDiff.from_config(config, data.dim)
  model, sched = metadiff.model, metadiff.train_schedule
  metadiff = diffusion_step_memory(model, sched, int(config.train.episodes_per_step), ways,
                                   shots, model.feature_dim, data.dim) / 2**20
  curves["metadiff"] = [metadiff] * len(a.memory_inner_steps)
  return {"inner_steps": [int(s) for s in a.memory_inner_steps], "mib": curves,
          "episodes_per_step": {"unrolled": episodes,
                                "metadiff": int(config.train.episodes_per_step)},
          "shots": shots, "queries": int(a.queries), "backend": jax.default_backend(),
          "measure": "XLA memory analysis of the compiled step: arguments + outputs + "
                     "temporaries - donated (aliased) bytes"}


def memory_markdown(memory: dict) -> str:
  names = {"anil": "ANIL", "metalstm": "MetaLSTM", "alfa": "ALFA",
           "metadiff": "MetaDiff (diffusion step)"}
  lines = ["# Figure 4: memory of one meta-training step", "",
           f"{memory['measure']}; backend {memory['backend']}; 1-shot episodes, "
           f"{memory['episodes_per_step']['unrolled']} per step for the unrolled baselines "
           f"({memory['queries']} queries a class), "
           f"{memory['episodes_per_step']['metadiff']} for MetaDiff.", "",
           "| method | " + " | ".join(f"{s} inner steps" for s in memory["inner_steps"]) + " |",
           "|---|" + "---|" * len(memory["inner_steps"])]
  for name, mib in memory["mib"].items():
    lines.append(f"| {names[name]} | " + " | ".join(f"{m:.2f} MiB" for m in mib) + " |")
  return "\n".join(lines) + "\n"


def plot_memory(memory: dict, path: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.subplots()
  names = {"anil": "ANIL", "metalstm": "MetaLSTM", "alfa": "ALFA",
           "metadiff": "MetaDiff (no inner loop)"}
  for name, mib in memory["mib"].items():
    ax.plot(memory["inner_steps"], mib, marker="o", label=names[name],
            linestyle="--" if name == "metadiff" else "-")
  # Log scale: MetaLSTM's coordinate-wise LSTM takes orders of magnitude more than the rest.
  ax.set(xlabel="inner-loop steps", ylabel="MiB per training step (log scale)", yscale="log",
         title=f"Figure 4: training-step memory ({memory['backend']})")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, format="png", dpi=110)


# ----------------------------------------------------------------------------- tables

def table_markdown(config, title: str, rows, results: dict) -> str:
  """One table: our accuracy per shot setting, and the paper's miniImageNet figures."""
  shots = sorted(results)
  ways = config.eval.ways
  lines = [f"# {title}", "",
           f"{config.data.name}, {config.backbone.name}; {ways}-way, mean ± 95% CI over "
           f"{_test_episodes(config)} test episodes. Paper: Zhang et al. 2024 (miniImageNet, "
           "ResNet12), for comparison of the ranking, not of the numbers.", "",
           "| Method | " + " | ".join(f"{ways}-way {k}-shot" for k in shots)
           + " | paper 1-shot | paper 5-shot |",
           "|---|" + "---|" * (len(shots) + 2)]
  for row, label in rows:
    cells = []
    for k in shots:
      r = results[k].get(row)
      cells.append("—" if r is None else f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}%")
    paper = PAPER.get(row)
    cells += (["—", "—"] if paper is None else
              [f"{paper[0]:.2f} ± {paper[1]:.2f}%", f"{paper[2]:.2f} ± {paper[3]:.2f}%"])
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  notes = []
  for k in shots:
    for row in ("gda", "gda_momentum"):
      r = results[k].get(row)
      if r and any(row == name for name, _ in rows):
        notes.append(f"- {k}-shot {row}: tuned on validation to {r['tuning']['best']} "
                     f"(validation accuracy {100 * r['tuning']['val_accuracy']:.2f}%)")
    for row in ("anil", "metalstm", "alfa", "linear_alfa"):
      r = results[k].get(row)
      if r and any(row == name for name, _ in rows):
        notes.append(f"- {k}-shot {row}: untrained {100 * r['untrained']['mean']:.2f}%, "
                     f"best validation at meta-step {r['training']['best_step']}")
    for row in ("metadiff", "cosine_ce", "linear_metadiff", "no_unet"):
      r = results[k].get(row)
      if r and any(row == name for name, _ in rows):
        notes.append(f"- {k}-shot {row}: norm ratio {r['norm_ratio']:.3g}, support loss "
                     f"{r['support_loss']:.4g}")
  if notes:
    lines += [""] + notes
  return "\n".join(lines) + "\n"


def _write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)

