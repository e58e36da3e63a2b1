"""Stage (optional): does the reverse process hold up? The faithful method beside its variants.

    python -m metadiff_jax.main --config configs/stability.py:dataset=glyphs --workdir DIR

On the pipeline's frozen features (the pretrain and prototypes stages' WORKDIR), for each shot
setting and each variant named in config.stability.variants (`config_lib.VARIANTS`: the
faithful original, other samplers, other TCUNet inputs, x0-prediction, rescaled features), at
the config's learning rate and, for config.stability.lr_variants, at each of
config.stability.learning_rates too:

1. a denoiser is trained as the train stage trains one (validation every
   config.stability.val_every_steps steps, or train.val_every_steps where that is None, on
   the same validation episodes, with the original update; the best checkpoint kept), in WORKDIR/stability/denoisers/<what it trains>/; variants that
   change only the sampler reuse the faithful denoiser;
2. on the eval stage's test episodes (the same episodes and the same w_T for every row):
   the accuracy (mean +- 95% CI) of its best-validated checkpoint, of its last one, and of the
   same variant untrained, with the norm ratio (the sampled prototypes' mean norm over that of
   the support class means; far above 1: the sampler diverged);
3. diagnostics of its last checkpoint: the norm ratio and the accuracy along the reverse
   trajectory (`method.trajectory_metrics`) beside the norm an on-track trajectory would
   have, sqrt(abar_t |m|^2 + (1 - abar_t) W) per row (the forward process's marginal from the
   class means), and the held-out noise error per range of steps
   (`method.noise_error_table`);
4. the training-length curve: the validation accuracy and norm ratio at every validation.

Beside them, on the same episodes, two rows without a denoiser: class-mean prototypes, and
the class means shrunk by the linear map that best predicts a base class's mean from K of its
images (`prototypes.fit_linear_shrinkage`, config.stability.shrinkage_*). The
config.stability.length_variants are also trained for each of config.stability.lengths steps
(rows "<variant>@steps=<n>", validated and checkpointed every n / 20 steps). Outputs, in WORKDIR/stability/:
stability.md (the tables), stability.json (everything), <K>shot.png (training length, the
trajectory's norm ratio and the noise error per step range), and one JSON per row under
<K>shot/, reused when its settings have not changed. docs/STABILITY.md is what it found.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from metadiff_jax import (checkpoint, config_lib, diffusion_training, embedding, evaluator, mesh,
                          method, metrics, prototypes, rng)
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.data import features

# What each variant changes in the paper's Eq. 7-12 (docs/STABILITY.md says why).
DESCRIPTIONS = {
    "faithful": "the original: the TCUNet reads g = dL/dw_t (Eq. 11) alone and predicts eps "
                "(Eq. 12); deterministic update (Eq. 8)",
    "ddpm": "Eq. 8 plus sigma_t z, sigma_t^2 = beta_t (DDPM's stochastic step); faithful "
            "denoiser",
    "ddim": "DDIM's deterministic step (eta = 0) instead of Eq. 8; faithful denoiser",
    "weights": "the TCUNet's first block reads [g, w_t]",
    "means": "the TCUNet's first block reads [g, m_hat] (support class means)",
    "weights_means": "the TCUNet's first block reads [g, w_t, m_hat]",
    "normalized": "features rescaled to RMS 1 (norm sqrt(D)) before Eq. 7-12",
    "mean_gradient": "g is the gradient of Eq. 11 as printed, the mean over the support set, "
                     "not the original code's sum: 1 / (N K) of its size",
    "x0": "the network outputs w_0: Eq. 12 regresses w_0, Eq. 8 uses the eps it implies",
    "x0_weights": "x0-prediction and the first block reads [g, w_t]",
    "weights_normalized": "the first block reads [g, w_t], and features are rescaled to "
                          "RMS 1 (weights + normalized)",
    "weights_normalized_mean": "weights + normalized + mean_gradient: the first block reads "
                               "[g, w_t], features at RMS 1, g from the mean support loss",
    "weights_normalized_shot_mean": "weights + normalized, and g from the support loss "
                                    "averaged within each class, 2 (w_t - m_hat) whatever K "
                                    "(the same as weights_normalized at 1-shot)",
    "residual": "weights_normalized_shot_mean with x0-prediction as a correction to the "
                "support means: x0 = m_hat + (TCUNet output - g)",
    "linear_prior": "residual with a learned linear prior: x0 = m_hat + m_hat L + c + "
                    "(TCUNet output - g), L and c trained with the rest from zero; sampled in "
                    "10 respaced steps",
    "linear_prior_full": "linear_prior sampled in all T steps",
}
# The rows without a denoiser, beside the variants.
REFERENCE_ROWS = {
    "class_means": "class-mean prototypes",
    "shrinkage": "class means shrunk by the linear map fit on the base classes "
                 "(prototypes.fit_linear_shrinkage), no diffusion",
    "transductive": "transductive: class means refined by soft k-means over the episode's "
                    "unlabelled queries (prototypes.refine_with_queries)",
    "shrinkage_transductive": "transductive: the shrunk class means refined so",
}


def stability_dir(workdir: str) -> str:
  return workdir_lib.stage_dir(workdir, "stability")


def shots_of(config) -> tuple[int, ...]:
  return tuple(int(k) for k in (config.stability.shots or config_lib.eval_shots(config)))


def row_name(variant: str, learning_rate: float, default_rate: float,
             steps: int | None = None) -> str:
  """A row's name: the variant, with its learning rate where it is not the config's and its
  training steps where they are not the study's."""
  name = variant if learning_rate == default_rate else f"{variant}@lr={learning_rate:g}"
  return name if steps is None else f"{name}@steps={int(steps)}"


def rows_of(config) -> list[tuple[str, str, float, int | None]]:
  """(row, variant, learning rate, training steps or None for the study's) of every row, in
  table order."""
  s, lr = config.stability, float(config.train.learning_rate)
  rows = []
  for name in s.variants:
    rates = [lr] + ([float(r) for r in s.learning_rates if float(r) != lr]
                    if name in s.lr_variants else [])
    rows += [(row_name(name, r, lr), name, r, None) for r in rates]
    if name in s.length_variants:
      rows += [(row_name(name, lr, lr, n), name, lr, int(n)) for n in s.lengths]
  return rows


def variant_config(config, variant: str, learning_rate: float, steps: int | None = None):
  """The config of one row: the variant's fields, its learning rate and training steps."""
  out = config.copy_and_resolve_references()
  config_lib.apply_variant(out, variant)
  out.train.learning_rate = float(learning_rate)
  for field in ("steps", "val_every_steps", "checkpoint_every_steps", "val_episodes"):
    if config.stability[field] is not None:
      out.train[field] = int(config.stability[field])
  if steps is not None:  # a length row: validated and checkpointed 20 times
    out.train.steps = int(steps)
    out.train.val_every_steps = out.train.checkpoint_every_steps = max(int(steps) // 20, 1)
  return out


def denoiser_dir(root: str, vconfig, shots: int) -> str:
  """Where a row's denoiser lives: named by what its training depends on, so that rows that
  change only the sampler share one (and, at 1-shot, where "shot_mean" is "sum", rows that
  differ only in that)."""
  d, diff = vconfig.denoiser, vconfig.diffusion
  reduction = "sum" if (d.loss_reduction == "shot_mean" and shots == 1) else d.loss_reduction
  name = "+".join(d.inputs) + f"_{d.prediction}_{reduction}"
  if diff.feature_rms is not None:
    name += f"_rms{float(diff.feature_rms):g}"
  if diff.num_sampling_steps is not None:  # validation, and so the best checkpoint, uses it
    name += f"_k{int(diff.num_sampling_steps)}"
  name += f"_lr{float(vconfig.train.learning_rate):g}_steps{int(vconfig.train.steps)}"
  return os.path.join(stability_dir(root), "denoisers", name)


def stage(config, workdir: str) -> dict:
  """Runs every row of the study; writes the tables, plots and JSON."""
  root = os.path.abspath(os.path.expanduser(workdir))
  splits = ("train", "val", "test")
  raw = dict(zip(splits, workdir_lib.pretrained_splits(config, root, splits)))
  results = {shots: study_shot(config, root, shots, raw) for shots in shots_of(config)}
  out = stability_dir(root)
  summary = {"dataset": config.data.name, "builder_config": config.data.builder_config,
             "backbone": config.backbone.name, "ways": config.eval.ways,
             "episodes": _episodes(config), "feature_dim": int(raw["train"].features.shape[1]),
             "learning_rate": float(config.train.learning_rate),
             "descriptions": DESCRIPTIONS}
  if mesh.is_writer():
    workdir_lib.write_json(os.path.join(out, "stability.json"),
                      {**summary, "results": {str(k): v for k, v in results.items()}})
    text = report_markdown(config, results)
    with open(os.path.join(out, "stability.md"), "w") as f:
      f.write(text)
    for shots, rows in results.items():
      plot_shot(rows, os.path.join(out, f"{shots}shot.png"),
                f"{config.data.name}, {config.eval.ways}-way {shots}-shot")
    print(text, flush=True)
  return results


def _episodes(config) -> int:
  return int(config.stability.episodes or config.eval.episodes)


def study_shot(config, root: str, shots: int, raw: dict) -> dict:
  """Every row for K = `shots`: {row: result}."""
  e = config.eval
  count = _episodes(config)
  out = os.path.join(stability_dir(root), f"{shots}shot")
  # The same episodes for every row: the labels do not depend on how features are scaled.
  sampler = episodes_lib.EpisodeSampler(raw["test"].labels, e.ways, shots, e.queries,
                                        config.seed, "test")
  key = rng.key(config, "sampling", 2)  # the eval stage's: the same w_T per episode
  common_settings = {"shots": shots, "ways": e.ways, "queries": e.queries, "episodes": count,
                     "seed": config.seed, "features": raw["test"].key}

  def cached(row, settings, compute):
    return workdir_lib.cached_result(os.path.join(out, f"{row.replace('@', '_')}.json"),
                                {**common_settings, **settings}, compute,
                                f"stability {shots}-shot {row}")

  test_dev = mesh.replicate(raw["test"].features)
  s = config.stability

  shrinkage_settings = {"base": raw["train"].key, "draws": int(s.shrinkage_draws),
                        "l2": float(s.shrinkage_l2)}

  @functools.cache
  def shrinkage():
    """The linear shrinkage fit once, where a row that needs it is not cached."""
    base = raw["train"]
    return mesh.replicate(prototypes.fit_linear_shrinkage(
        base.features, base.labels, shots, int(s.shrinkage_draws), float(s.shrinkage_l2),
        config.seed))

  def reference(shrink: bool, transductive_steps: int = 0):
    return lambda: metrics.summarize(evaluator.class_mean_accuracy(
        test_dev, sampler, count, e.batch_episodes, shrinkage=shrinkage() if shrink else None,
        transductive_steps=transductive_steps))

  results = {
      "class_means": cached("class_means", {}, reference(False)),
      "shrinkage": cached("shrinkage", shrinkage_settings, reference(True))}
  if s.transductive_steps:
    steps = {"transductive_steps": int(s.transductive_steps)}
    results["transductive"] = cached("transductive", steps,
                                     reference(False, int(s.transductive_steps)))
    results["shrinkage_transductive"] = cached(
        "shrinkage_transductive", {**shrinkage_settings, **steps},
        reference(True, int(s.transductive_steps)))
  for row, variant, rate, steps in rows_of(config):
    results[row] = variant_row(config, root, variant, rate, shots, raw, sampler, count, key,
                               cached, steps=steps)
  return results


def variant_row(config, root, variant, rate, shots, raw, sampler, count, key, cached,
                steps=None) -> dict:
  """Trains (or resumes) one row's denoiser and measures it (see the module docstring)."""
  s = config.stability
  vconfig = variant_config(config, variant, rate, steps)
  data = {split: embedding.diffusion_features(vconfig, fs) for split, fs in raw.items()}
  dim = int(data["train"].features.shape[1])
  where = denoiser_dir(root, vconfig, shots)
  if vconfig.denoiser.unet:
    # Training, and so the validation that keeps the best checkpoint, uses the original
    # update whatever the row samples with: rows that differ only in the sampler share one
    # denoiser, whichever of them runs first.
    trainer = vconfig.copy_and_resolve_references()
    trainer.diffusion.sampler = "original"
    targets = workdir_lib.diffusion_targets(vconfig, root, data["train"])
    diffusion_training.train_shot(trainer, where, shots, data["train"], targets, data["val"])
  metadiff, best, init, _ = workdir_lib.load_denoiser(vconfig, where, shots, dim)
  model = metadiff.model
  last = _last_state(where, shots, init)
  states = {"best": best.ema_params, "last": last.ema_params, "untrained": init.params}
  sampler_settings = method.sampler_settings(vconfig)
  settings = {"variant": variant, "learning_rate": rate, "steps": int(vconfig.train.steps),
              "sampler": sampler_settings,
              "denoisers": {k: features.variables_fingerprint(v) for k, v in states.items()},
              "trajectory_every": int(s.trajectory_every),
              "diagnostics": [int(s.diagnostic_episodes), int(s.diagnostic_buckets)]}

  def compute():
    test_dev = mesh.replicate(data["test"].features)
    result = {"description": DESCRIPTIONS.get(variant, ""),
              "best_step": int(best.step),
              "last_step": int(last.step)}
    for name, params in states.items():
      m = metadiff.evaluate({"params": params}, test_dev, sampler, count,
                            config.eval.batch_episodes, key,
                            desc=f"stability {shots}-shot {variant} {name}")
      result[name] = {**metrics.summarize(m["accuracy"]),
                      "norm_ratio": float(np.mean(m["norm_ratio"])),
                      "support_loss": float(np.mean(m["support_loss"])),
                      "class_means": float(np.mean(m["prototype_accuracy"]))}
    result["trajectory"] = _trajectory(metadiff, {"params": states["last"]}, test_dev, sampler,
                                       min(count, int(s.diagnostic_episodes) or count),
                                       config.eval.batch_episodes, key,
                                       int(s.trajectory_every))
    if s.diagnostic_episodes and model.head == "prototype":
      test = data["test"]
      targets = np.asarray(features.class_means(test.features, test.labels, test.num_classes))
      tables = {name: method.noise_error_table(
          model, {"params": states[name]}, metadiff.train_schedule, test_dev, targets,
          sampler, min(count, int(s.diagnostic_episodes)), config.eval.batch_episodes,
          rng.key(config, "sampling", 3), int(s.diagnostic_buckets))
                for name in ("last", "untrained")}
      result["noise_error"] = {"steps": tables["last"]["steps"], "n": tables["last"]["n"],
                               "last": tables["last"]["model"],
                               "untrained": tables["untrained"]["model"],
                               "zero": tables["last"]["zero"],
                               "support_means": tables["last"]["support_means"]}
    records = metrics.read_jsonl(os.path.join(workdir_lib.train_dir(where, shots),
                                              "metrics.jsonl"))
    result["training"] = {
        "steps": [r["step"] for r in records if "val_accuracy" in r],
        "val_accuracy": [r["val_accuracy"] for r in records if "val_accuracy" in r],
        "val_norm_ratio": [r["val_norm_ratio"] for r in records if "val_accuracy" in r],
        "val_class_means": [r.get("val_prototype_accuracy") for r in records
                            if "val_accuracy" in r],
        "loss_steps": [r["step"] for r in records if "loss" in r],
        "loss": [r["loss"] for r in records if "loss" in r]}
    return result

  return cached(row_name(variant, rate, float(config.train.learning_rate), steps), settings,
                compute)


def _last_state(where: str, shots: int, init):
  """The denoiser's last checkpoint (its EMA parameters are what "last" reports)."""
  if not jax.tree_util.tree_leaves(init.params):
    return init
  store = checkpoint.Checkpoints(os.path.join(workdir_lib.train_dir(where, shots), "checkpoints"),
                                 max_to_keep=2)
  try:
    state, _ = store.restore(init)
  finally:
    store.close()
  return state


def _trajectory(metadiff, variables, test_dev, sampler, count, batch, key, every) -> dict:
  """Mean accuracy and norm ratio along the reverse trajectory, with the on-track norm."""
  sched, model = metadiff.sample_schedule, metadiff.model
  every, m = metadiff.trajectory(variables, test_dev, sampler, count, batch, key, every)
  acc, norm, ref = (m[name].astype(np.float64) for name in ("accuracy", "norm", "reference_norm"))
  k = sched.num_steps
  taken = np.arange(norm.shape[1]) * every
  # After n reverse steps the weights should be at the noise level of step K - 1 - n
  # (abar = 1 once all K are taken): per row, E|w|^2 = abar |m|^2 + (1 - abar) W.
  abar = np.where(taken < k, np.asarray(sched.alphas_cumprod, np.float64)[
      np.clip(k - 1 - taken, 0, k - 1)], 1.0)
  width = model.feature_dim
  on_track = np.sqrt(abar[None] * ref[:, None] ** 2 + (1 - abar[None]) * width) / ref[:, None]
  return {"steps": taken.tolist(), "accuracy": acc.mean(0).tolist(),
          "norm_ratio": (norm / ref[:, None]).mean(0).tolist(),
          "on_track_norm_ratio": on_track.mean(0).tolist(), "n": int(count)}


# ----------------------------------------------------------------------------- reports

def _cell(r: dict) -> str:
  return f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}"


def report_markdown(config, results: dict) -> str:
  """stability.md: per shot setting, the accuracy table, the learning rates, the diagnostics."""
  ways = config.eval.ways
  lines = [f"# Stability study: {config.data.name}, {config.backbone.name}, {ways}-way", "",
           f"{_episodes(config)} test episodes (the same for every row, and the same w_T), "
           "mean ± 1.96·std/√n in %. *best*: the checkpoint with the best validation "
           "accuracy (at the step given); *last*: the last one. Norm ratio: the sampled "
           "prototypes' mean norm over that of the support class means (far above 1: the "
           "sampler diverged). Learning rate "
           f"{float(config.train.learning_rate):g} unless the row says otherwise.", ""]
  for shots, rows in results.items():
    lines += [f"## {ways}-way {shots}-shot", "",
              "| Variant | best | (step) | last | norm ratio, last | untrained | "
              "norm ratio, untrained |", "|---|---|---|---|---|---|---|",
              f"| class-mean prototypes | {_cell(rows['class_means'])} | | | 1 | | |"]
    if "shrinkage" in rows:
      lines.append(f"| linear shrinkage (no diffusion) | {_cell(rows['shrinkage'])} | | | | | |")
    for name, r in rows.items():
      if name in REFERENCE_ROWS:
        continue
      lines.append(f"| {name} | {_cell(r['best'])} | {r['best_step']} | {_cell(r['last'])} "
                   f"| {r['last']['norm_ratio']:.3g} | {_cell(r['untrained'])} | "
                   f"{r['untrained']['norm_ratio']:.3g} |")
    if "transductive" in rows:
      lines += ["", "Transductive rows (they also read the episode's unlabelled queries, another "
                f"setting; {int(config.stability.transductive_steps)} soft k-means round(s)): "
                f"class means {_cell(rows['transductive'])}, linear shrinkage "
                f"{_cell(rows['shrinkage_transductive'])}."]
    lines += ["", f"### Training length, {shots}-shot: validation accuracy (%) and norm ratio",
              "", "Validation (with the original update) every few hundred steps; the rows "
              "that change only the sampler share the faithful denoiser and its curve.", ""]
    named = [(n, r) for n, r in rows.items() if n not in REFERENCE_ROWS
             and r["settings"]["sampler"]["update"] == "original"]
    steps = sorted({st for _, r in named for st in r["training"]["steps"]})
    lines += ["| Variant | " + " | ".join(str(st) for st in steps) + " |",
              "|---|" + "---|" * len(steps)]
    for n, r in named:
      by_step = dict(zip(r["training"]["steps"],
                         zip(r["training"]["val_accuracy"], r["training"]["val_norm_ratio"])))
      cells = [f"{100 * by_step[st][0]:.1f} ({by_step[st][1]:.2g})" if st in by_step else ""
               for st in steps]
      lines.append(f"| {n} | " + " | ".join(cells) + " |")
    errors = [(n, r["noise_error"]) for n, r in rows.items()
              if n not in REFERENCE_ROWS and "noise_error" in r
              and r["settings"]["sampler"]["update"] == "original"]
    if errors:
      first = errors[0][1]
      lines += ["", f"### Held-out noise error, {shots}-shot (last checkpoint)", "",
                "Mean squared error of the noise estimate per range of steps, on test "
                "episodes whose targets are the test classes' means (1: predicting no "
                "noise; *support means*: the exact noise were the target the support class "
                "means). The noise estimate does not depend on the sampler.", "",
                "| Variant | " + " | ".join(f"{lo}-{hi - 1}" for lo, hi in first["steps"]) + " |",
                "|---|" + "---|" * len(first["steps"])]
      for n, err in errors:
        lines.append(f"| {n} | " + " | ".join(f"{v:.3g}" for v in err["last"]) + " |")
      lines.append("| *support means* | " + " | ".join(f"{v:.3g}"
                                                       for v in first["support_means"]) + " |")
    lines.append("")
  lines += ["## Variants", ""] + [f"- **{n}**: {d}" for n, d in DESCRIPTIONS.items()
                                  if n in config.stability.variants] + [""]
  return "\n".join(lines)


def plot_shot(rows: dict, path: str, title: str) -> None:
  """Training length, the trajectory's norm ratio and the noise error, one line per row."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(18, 5), layout="constrained")
  ax_val, ax_traj, ax_err = fig.subplots(1, 3)
  named = [(n, r) for n, r in rows.items() if n not in REFERENCE_ROWS]
  colors = matplotlib.colormaps["tab20"].colors
  for i, (n, r) in enumerate(named):
    style = {"color": colors[i % len(colors)], "label": n,
             "ls": "--" if "@" in n else "-"}  # dashed: another learning rate
    t = r["training"]
    if t["steps"] and r["settings"]["sampler"]["update"] == "original":
      ax_val.plot(t["steps"], 100 * np.asarray(t["val_accuracy"]), marker=".", **style)
    tr = r["trajectory"]
    ax_traj.plot(tr["steps"], tr["norm_ratio"], **style)
    if "noise_error" in r and r["settings"]["sampler"]["update"] == "original":
      err = r["noise_error"]
      ax_err.plot([lo for lo, _ in err["steps"]], err["last"], marker=".", **style)
  if named:
    tr = named[0][1]["trajectory"]
    ax_traj.plot(tr["steps"], tr["on_track_norm_ratio"], "k--", label="on track")
    err = next((r["noise_error"] for _, r in named if "noise_error" in r), None)
    if err:
      ax_err.plot([lo for lo, _ in err["steps"]], err["support_means"], "k--",
                  label="support means")
      ax_err.axhline(1.0, color="gray", lw=0.8, label="eps_hat = 0")
  ax_val.set(xlabel="training step", ylabel="validation accuracy (%)",
             title="training length")
  ax_traj.set(xlabel="reverse steps taken", ylabel="norm / support means' norm",
              title="reverse trajectory (last checkpoint)", yscale="log")
  ax_err.set(xlabel="diffusion step t (range start)", ylabel="noise MSE",
             title="held-out noise error (last checkpoint)", yscale="log")
  reference = next((r["training"]["val_class_means"] for _, r in named
                    if r["training"].get("val_class_means")), None)
  if reference and reference[0] is not None:  # the same validation episodes, class means
    ax_val.axhline(100 * reference[0], color="k", lw=0.8, ls=":", label="class means")
  for ax in (ax_val, ax_traj, ax_err):
    ax.grid(alpha=0.3)
  ax_traj.legend(fontsize=7, loc="upper left")
  ax_val.legend(fontsize=7, loc="lower left")
  ax_err.legend(fontsize=7, loc="lower left")
  fig.suptitle(f"Stability: {title}")
  fig.savefig(path, format="png", dpi=100)
