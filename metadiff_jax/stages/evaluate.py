"""Stage 4: episodic evaluation on the test split (Algorithm 2), with 95% confidence intervals.

For each shot setting K that was trained, the test split's N-way K-shot episodes (600 by
default, 15 queries a class) are classified three ways on the same frozen features and the same
episodes:

- MetaDiff: prototypes denoised from w_T ~ N(0, I) by the trained TCUNet (its EMA parameters)
  conditioned on the support set, in the full T-step reverse loop; queries scored by
  10 x cosine against them (the original's classifier);
- the same sampler with the untrained denoiser (the TCUNet at its initialisation). Even this one
  drifts toward the support means, because its output contains the support-loss gradient, so
  it separates what training adds from what the architecture gives for free;
- class-mean prototypes (ProtoNet-style), under the same 10 x cosine classifier.

Each is reported as mean +- 1.96 std / sqrt(n) over episodes, with a divergence diagnostic: the
mean norm of the sampled prototypes over that of the class-mean prototypes (1 means the sampler
lands at the scale of the support means; far above 1, it diverged). w_T of episode i is drawn
from fold_in(key, i), so the methods, batch sizes and reruns all see the same starting noise.

The MetaDiff row samples with the best-validated denoiser (train_<K>shot/best) unless
config.eval.checkpoint names "last" or a kept step; a row below it reports the last
checkpoint (or, when the last one is evaluated, the best-validated one), since a sampler that
diverges after its best validation would otherwise go unseen. An episode whose sampled weights
are not finite counts as diverged; a row where all did reads "diverged", not a chance accuracy.

With the linear head (config.denoiser.head = "linear", Table 4) MetaDiff samples the linear
classifier [N, D + 1] and scores queries by W f + b; class-mean prototypes stay the reference
row, and the norm ratio compares with the rows of the linear head fit on the support set
(`heads.fit_linear`, config.prototypes.linear_fit_*), the scale a support-set solve reaches.
Without the UNet (config.denoiser.unet = False) there is no checkpoint: eps is the gradient,
and the untrained row is the same sampler.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from metadiff_jax import config_lib, embedding, mesh, method, metrics, rng
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.data import features

METHODS = (("metadiff", "MetaDiff (trained TCUNet, EMA)"),
           ("untrained", "Same sampler, untrained TCUNet"),
           ("prototypes", "Class-mean prototypes (ProtoNet-style)"))


CHECKPOINT_LABELS = {"best": "best-validated checkpoint", "last": "last checkpoint"}


def _companion(config, workdir: str, shots: int, which, step: int) -> str | None:
  """Which checkpoint the results report beside the evaluated one: the last one, or where
  that is the one evaluated, the best-validated one (None if it is not kept, or w/o UNet)."""
  if not config.denoiser.unet:
    return None
  steps = workdir_lib.kept_steps(workdir, shots)
  last = max(steps["checkpoints"], default=None)
  evaluated_last = which == "last" or (which != "best" and step == last)
  if evaluated_last:
    return "best" if steps["best"] else None
  return "last" if steps["checkpoints"] else None


def row_summary(run: dict) -> dict:
  """The results row of one sampler's `method.run_episodes` metrics: accuracy (mean, ci95, n), mean
  norm ratio and support loss, and how many episodes diverged (their sampled weights are not
  finite, so their norm ratio is NaN or infinite and their accuracy is a tie-break, not a
  measurement)."""
  ratio = np.asarray(run["norm_ratio"])
  return {**metrics.summarize(run["accuracy"]), "norm_ratio": float(ratio.mean()),
          "support_loss": float(np.mean(run["support_loss"])),
          "diverged": int(np.sum(~np.isfinite(ratio)))}


def evaluate_shot(config, workdir: str, shots: int, test: features.FeatureSet) -> dict:
  """The results of the K-shot setting, or a UserError if its denoiser was not trained.

  The MetaDiff row samples with the checkpoint config.eval.checkpoint names; a
  "metadiff_last" row (or "metadiff_best", where the evaluated one is the last) reports the
  other one beside it, with its step.
  """
  e = config.eval
  # First, so that an episode the split cannot supply is reported before any work.
  sampler = episodes_lib.EpisodeSampler(test.labels, e.ways, shots, e.queries, config.seed,
                                        "test")
  which = config_lib.eval_checkpoint(config)
  dim = test.features.shape[1]
  metadiff, state, init_state, meta = workdir_lib.load_denoiser(config, workdir, shots, dim,
                                                                which)
  model = metadiff.model
  fingerprint = features.variables_fingerprint(state.ema_params)
  companion = _companion(config, workdir, shots, which, int(state.step))
  if companion is not None:
    other = workdir_lib.restore_denoiser(workdir, shots, init_state, companion)[0]
    other_fingerprint = features.variables_fingerprint(other.ema_params)
  settings = {"ways": e.ways, "shots": shots, "queries": e.queries, "episodes": e.episodes,
              "diagnostics": [e.diagnostic_episodes, e.diagnostic_buckets],
              "seed": config.seed, "denoiser": fingerprint, "features": test.key,
              "sampler": method.sampler_settings(config),
              "variant": method.variant_settings(config),
              "checkpoint": [which, int(state.step)]}
  if companion is not None:
    settings[f"{companion}_checkpoint"] = [int(other.step), other_fingerprint]
  cached = os.path.join(workdir_lib.stage_dir(workdir, "eval"), f"{shots}shot.json")
  if os.path.exists(cached):
    with open(cached) as f:
      previous = json.load(f)
    if previous.get("settings") == settings:
      logging.info("eval: %d-shot results for this denoiser already in %s; skipping", shots,
                   cached)
      return previous
  key = rng.key(config, "sampling", 2)
  features_dev = mesh.replicate(test.features)
  samplers = [("metadiff", state.ema_params), ("untrained", init_state.params)]
  if companion is not None:
    samplers.append((f"metadiff_{companion}", other.ema_params))
  runs = {}
  for name, params in samplers:
    if name == "untrained" and not jax.tree_util.tree_leaves(params):
      runs[name] = runs["metadiff"]  # w/o UNet: nothing was trained, the same sampler
      continue
    if name.startswith("metadiff_") and other_fingerprint == fingerprint:
      runs[name] = runs["metadiff"]  # the same step (e.g. the best is the last): no rerun
      continue
    runs[name] = metadiff.evaluate({"params": params}, features_dev, sampler, e.episodes,
                                   e.batch_episodes, key, desc=f"eval {shots}-shot {name}")
  diagnostics = {}
  if e.diagnostic_episodes and model.head == "prototype":
    targets = np.asarray(features.class_means(test.features, test.labels, test.num_classes))
    count = min(int(e.diagnostic_episodes), e.episodes)
    errors = {}
    for name, params in (("metadiff", state.ema_params), ("untrained", init_state.params)):
      errors[name] = method.noise_error_table(
          model, {"params": params}, metadiff.train_schedule, features_dev, targets, sampler,
          count,
          e.batch_episodes, rng.key(config, "sampling", 3), int(e.diagnostic_buckets))
    diagnostics["noise_error"] = {
        "steps": errors["metadiff"]["steps"], "n": count,
        "metadiff": errors["metadiff"]["model"], "untrained": errors["untrained"]["model"],
        "zero": errors["metadiff"]["zero"], "support_means": errors["metadiff"]["support_means"]}
  result = {
      "settings": settings,
      "diagnostics": diagnostics,
      "checkpoint": {"step": int(state.step), "validation": meta, "choice": which},
      "metadiff": row_summary(runs["metadiff"]),
      "untrained": row_summary(runs["untrained"]),
      "prototypes": {**metrics.summarize(runs["metadiff"]["prototype_accuracy"]),
                     "norm_ratio": 1.0, "support_loss": None},
  }
  if companion is not None:
    result[f"metadiff_{companion}"] = {**row_summary(runs[f"metadiff_{companion}"]),
                                       "step": int(other.step)}
  for name, label in _sampled_rows(result):
    r = result[name]
    if r["diverged"]:
      logging.warning("eval %d-shot: %s diverged in %d of %d episodes (non-finite sampled "
                      "weights)", shots, label, r["diverged"], r["n"])
  if mesh.is_writer():
    workdir_lib.write_json(cached, result)
  return result


def stage(config, workdir: str) -> dict:
  """Evaluates every trained shot setting; writes WORKDIR/results.json and results.md."""
  test = embedding.diffusion_features(config,
                                      workdir_lib.pretrained_features(config, workdir, "test"))
  results = {}
  for shots in config_lib.eval_shots(config):
    results[f"{shots}shot"] = evaluate_shot(config, workdir, shots, test)
  summary = {
      "dataset": {"name": config.data.name, "builder_config": config.data.builder_config,
                  "test_features": test.key},
      "backbone": config.backbone.name,
      "results": results,
      "config": config.to_dict(),
  }
  table = results_table(config, results)
  if mesh.is_writer():
    root = os.path.abspath(os.path.expanduser(workdir))
    workdir_lib.write_json(os.path.join(root, "results.json"), summary)
    with open(os.path.join(root, "results.md"), "w") as f:
      f.write(results_markdown(config, workdir, results, table))
  if mesh.is_writer():
    print(table, flush=True)
  return summary


def results_table(config, results: dict) -> str:
  """The accuracy table (Markdown): one row per method, one column per shot setting."""
  shots = list(results)
  ways = config.eval.ways
  header = "| Method | " + " | ".join(f"{ways}-way {s.replace('shot', '-shot')}"
                                       for s in shots)
  header += " | " + " | ".join(f"norm ratio {s.replace('shot', '-shot')}" for s in shots)
  lines = [header + " |", "|" + "---|" * (1 + 2 * len(shots))]
  choice = config_lib.eval_checkpoint(config)
  rows = [(name, _row_label(name, choice) if name == "metadiff" else label)
          for name, label in METHODS]
  # The other checkpoint's row last, so that the table of the evaluated one reads as before.
  rows += [(name, _row_label(name, choice)) for name in COMPANION_ROWS
           if any(name in results[s] for s in shots)]
  for name, label in rows:
    cells = [accuracy_cell(results[s].get(name)) for s in shots]
    cells += [f"{results[s][name]['norm_ratio']:.3g}" if name in results[s] else "n/a"
              for s in shots]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  n = results[shots[0]]["metadiff"]["n"]
  lines.append("")
  d = config.denoiser
  if d.head == "linear":
    ratio = (" Norm ratio: mean norm of the sampled linear head's rows over that of the linear "
             "head fit on the support set (far above 1: the sampler diverged).")
  else:
    ratio = (" Norm ratio: mean norm of the classifier's prototypes over that of the "
             "class means (far above 1: the sampler diverged).")
  lines.append(f"{n} test episodes of {config.eval.queries} queries per class; mean ± 1.96·std/√n."
               + ratio)
  if (d.head, d.gradient, bool(d.unet)) != ("prototype", "l2", True):
    unet = "with the UNet" if d.unet else "without the UNet (eps = the gradient)"
    lines.append(f"Denoiser variant: head {d.head}, gradient {d.gradient}, {unet}.")
  variant = config_lib.variant_of(config)
  lines.append(f"Variant: {variant or 'custom'} (docs/STABILITY.md): TCUNet inputs "
               f"{'+'.join(d.inputs)}, {d.prediction}-prediction, {d.loss_reduction} support "
               f"loss, {config.diffusion.sampler} sampler, features "
               + ("as extracted." if config.diffusion.feature_rms is None
                  else f"rescaled to RMS {config.diffusion.feature_rms:g}."))
  if d.unet:
    lines.append(_checkpoint_note(results, choice))
  for s in shots:
    for name, label in _sampled_rows(results[s], choice):
      r = results[s][name]
      if r.get("diverged"):
        lines.append(f"Diverged: {label}, {s.replace('shot', '-shot')}: the sampled weights of "
                     f"{r['diverged']} of {r['n']} episodes are not finite"
                     + (" (no accuracy to report)." if r["diverged"] == r["n"] else
                        "; they count as classified by a tie-break."))
  return "\n".join(lines)


COMPANION_ROWS = ("metadiff_last", "metadiff_best")


def _row_label(name: str, choice) -> str:
  """The table label of a sampled row under config.eval.checkpoint = `choice`."""
  if name == "metadiff":
    label = dict(METHODS)["metadiff"]
    if choice == "best":  # the default keeps the label that earlier tables carry
      return label
    return f"{label}, " + (CHECKPOINT_LABELS["last"] if choice == "last" else f"step {choice}")
  if name == "untrained":
    return dict(METHODS)["untrained"]
  return f"MetaDiff, {CHECKPOINT_LABELS[name[len('metadiff_'):]]}"


def _sampled_rows(result: dict, choice=None) -> list[tuple[str, str]]:
  """(name, label) of the rows of `result` (one shot setting) that the sampler produced."""
  choice = result.get("checkpoint", {}).get("choice", "best") if choice is None else choice
  return [(name, _row_label(name, choice))
          for name in ("metadiff", "untrained") + COMPANION_ROWS if name in result]


def accuracy_cell(r: dict | None) -> str:
  """A results row's accuracy as the table shows it: mean ± ci95 in %, "diverged" where every
  episode diverged, "n/a" where the row is missing."""
  if r is None:
    return "n/a"
  if r.get("diverged") and r["diverged"] == r["n"]:
    return "diverged"  # every episode's weights are NaN or infinite: no accuracy to report
  return f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}%"


def _checkpoint_note(results: dict, choice) -> str:
  """The line that says which checkpoint each MetaDiff row sampled with, and its step."""
  what = {"best": "the best-validated checkpoint", "last": "the last checkpoint"}.get(
      choice, f"the checkpoint of step {choice}")

  def steps(get):
    return ", ".join(f"{get(r)} ({s.replace('shot', '-shot')})" for s, r in results.items()
                     if get(r) is not None)

  line = (f"MetaDiff row: {what} (config.eval.checkpoint = {choice!r}), step "
          f"{steps(lambda r: r['checkpoint']['step'])}.")
  for name in COMPANION_ROWS:
    other = steps(lambda r, name=name: r[name]["step"] if name in r else None)
    if other:
      line += f" {_row_label(name, choice)}: step {other}."
  return line


def noise_error_markdown(errors: dict, title: str) -> str:
  """The held-out noise error per range of steps (`noise_error_table`) as a Markdown table."""
  rows = [name for name in ("metadiff", "untrained", "zero", "support_means") if name in errors]
  labels = {"metadiff": "trained", "untrained": "untrained", "zero": "eps_hat = 0",
            "support_means": "eps_hat from the support means"}
  lines = [f"## {title}", "",
           f"Mean squared error of the noise estimate on {errors['n']} test episodes, their "
           "targets the test classes' means, at a step drawn in each range (1 is what "
           "predicting no noise scores; docs/STABILITY.md).", "",
           "| steps | " + " | ".join(labels[r] for r in rows) + " |",
           "|---|" + "---|" * len(rows)]
  for j, (lo, hi) in enumerate(errors["steps"]):
    lines.append(f"| {lo}-{hi - 1} | " + " | ".join(f"{errors[r][j]:.4g}" for r in rows) + " |")
  return "\n".join(lines)


def results_markdown(config, workdir: str, results: dict, table: str) -> str:
  """results.md: the table, what produced it, and the training curves."""
  root = os.path.abspath(os.path.expanduser(workdir))
  parts = [f"# Results: {config.data.name}, {config.backbone.name}", "", table, ""]
  for s, r in results.items():
    others = "".join(f"; {_row_label(name, r['checkpoint'].get('choice', 'best'))}: step "
                     f"{r[name]['step']}" for name in COMPANION_ROWS if name in r)
    parts.append(f"- {s}: denoiser {r['settings']['denoiser']} (step "
                 f"{r['checkpoint']['step']}{others}), test features {r['settings']['features']}")
  parts.append("")
  for s, r in results.items():
    errors = r.get("diagnostics", {}).get("noise_error")
    if errors:
      parts += [noise_error_markdown(errors, f"Held-out noise error, {s.replace('shot', '-shot')}"),
                ""]
  for title, rel in [("Backbone pretraining", "pretrain/curves.png")] + [
      (f"Diffusion training, {s.replace('shot', '-shot')}",
       f"{os.path.basename(workdir_lib.train_dir(root, int(s[:-4])))}/curves.png")
      for s in results]:
    if os.path.exists(os.path.join(root, rel)):
      parts += [f"## {title}", "", f"![{title}]({rel})", ""]
  return "\n".join(parts)
