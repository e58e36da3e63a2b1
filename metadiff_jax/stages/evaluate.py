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
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import checkpoint, config_lib, diffusion, metrics, prototypes
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.data import features
from metadiff_jax.errors import StageError
from metadiff_jax.stages import common
from metadiff_jax.stages import train as train_stage

METHODS = (("metadiff", "MetaDiff (trained TCUNet, EMA)"),
           ("untrained", "Same sampler, untrained TCUNet"),
           ("prototypes", "Class-mean prototypes (ProtoNet-style)"))


@functools.partial(jax.jit, static_argnames=("model", "ways"))
def episode_metrics(model, variables, sched, features_dev, support_idx, support_labels,
                    query_idx, query_labels, index, key, ways: int):
  """Per-episode metrics of sampled and class-mean prototypes.

  Args:
    model: the TCUNet; variables: its variables; sched: the schedule.
    features_dev: [n, D] the split's features.
    support_idx, support_labels: [B, N*K]; query_idx, query_labels: [B, N*Q] (`Episodes`).
    index: [B] episode indices (w_T of episode i comes from fold_in(key, i)).
    key: the sampling key.
    ways: N.

  Returns:
    {"accuracy", "prototype_accuracy", "norm_ratio", "support_loss"}: each [B].
  """
  support, query = features.gather(features_dev, support_idx, query_idx)
  dim = features_dev.shape[-1]
  w_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (ways, dim)))(index)
  w0 = diffusion.sample_batch(model, variables, sched, w_T, support, support_labels)
  protos = jax.vmap(prototypes.class_means, (0, 0, None))(support, support_labels, ways)

  def accuracy(w):
    logits = prototypes.cosine_logits(query, w, scale=10.0)
    return jnp.mean(jnp.argmax(logits, -1) == query_labels, axis=-1)

  def mean_norm(w):
    return jnp.mean(jnp.linalg.norm(w, axis=-1), axis=-1)

  loss = jax.vmap(prototypes.support_loss, (0, 0, 0, None))(
      w0, support, support_labels, "mean")
  return {"accuracy": accuracy(w0), "prototype_accuracy": accuracy(protos),
          "norm_ratio": mean_norm(w0) / mean_norm(protos), "support_loss": loss}


def run_episodes(model, variables, sched, feature_set: features.FeatureSet,
                 sampler: episodes_lib.EpisodeSampler, count: int, batch: int, key,
                 desc: str = "episodes", progress: bool = True) -> dict[str, np.ndarray]:
  """Metrics of episodes 0..count-1 of `sampler`, `batch` at a time ([count] arrays)."""
  features_dev = jnp.asarray(feature_set.features)
  batch = min(batch, count)
  out: dict[str, list] = {}
  with metrics.Progress(count, desc, unit="episode", enabled=progress) as bar:
    for start in range(0, count, batch):
      eps = sampler.batch(start, batch)  # a full batch (compiled once), trimmed below
      m = episode_metrics(model, variables, sched, features_dev, eps.support,
                          eps.support_labels, eps.query, eps.query_labels,
                          eps.index.astype(np.int32), key, sampler.ways)
      keep = min(batch, count - start)
      for name, value in m.items():
        out.setdefault(name, []).append(np.asarray(value)[:keep])
      bar.update(keep)
  return {name: np.concatenate(parts) for name, parts in out.items()}


def summarize(values: np.ndarray) -> dict[str, float]:
  """mean, the 95% half-width 1.96 std / sqrt(n) (population std), and n."""
  values = np.asarray(values, np.float64)
  n = len(values)
  return {"mean": float(values.mean()), "ci95": float(1.96 * values.std() / np.sqrt(n)),
          "n": n}


def evaluate_shot(config, workdir: str, shots: int, test: features.FeatureSet) -> dict:
  """The results of the K-shot setting, or a StageError if its denoiser was not trained."""
  e = config.eval
  # First, so that an episode the split cannot supply is reported before any work.
  sampler = episodes_lib.EpisodeSampler(test.labels, e.ways, shots, e.queries, config.seed,
                                        "test")
  run_dir = train_stage.run_dir(workdir, shots)
  store = checkpoint.Checkpoints(os.path.join(run_dir, "best"), max_to_keep=1)
  try:
    if store.latest_step() is None:
      raise StageError(f"no trained {shots}-shot denoiser in {run_dir}/best; run the train "
                       f"stage first (--config.stages=\"('train', 'eval')\") with "
                       f"config.train.shots including {shots}")
    model, sched, init_state = train_stage.initial_state(config, test.features.shape[1], shots)
    try:
      state, meta = store.restore(init_state)
    except ValueError as err:
      raise StageError(f"the denoiser in {run_dir}/best does not fit the config ("
                       f"{str(err).splitlines()[0]}); evaluate with the config it was "
                       "trained with") from None
  finally:
    store.close()
  fingerprint = features.variables_fingerprint(state.ema_params)
  settings = {"ways": e.ways, "shots": shots, "queries": e.queries, "episodes": e.episodes,
              "seed": config.seed, "denoiser": fingerprint, "features": test.key}
  cached = os.path.join(common.stage_dir(workdir, "eval"), f"{shots}shot.json")
  if os.path.exists(cached):
    with open(cached) as f:
      previous = json.load(f)
    if previous.get("settings") == settings:
      logging.info("eval: %d-shot results for this denoiser already in %s; skipping", shots,
                   cached)
      return previous
  key = common.key(config, "sampling", 2)
  runs = {}
  for name, params in (("metadiff", state.ema_params), ("untrained", init_state.params)):
    runs[name] = run_episodes(model, {"params": params}, sched, test, sampler, e.episodes,
                              e.batch_episodes, key, desc=f"eval {shots}-shot {name}")
  result = {
      "settings": settings,
      "checkpoint": {"step": int(state.step), "validation": meta},
      "metadiff": {**summarize(runs["metadiff"]["accuracy"]),
                   "norm_ratio": float(runs["metadiff"]["norm_ratio"].mean()),
                   "support_loss": float(runs["metadiff"]["support_loss"].mean())},
      "untrained": {**summarize(runs["untrained"]["accuracy"]),
                    "norm_ratio": float(runs["untrained"]["norm_ratio"].mean()),
                    "support_loss": float(runs["untrained"]["support_loss"].mean())},
      "prototypes": {**summarize(runs["metadiff"]["prototype_accuracy"]), "norm_ratio": 1.0,
                     "support_loss": None},
  }
  if common.is_writer():
    common.write_json(cached, result)
  return result


def stage(config, workdir: str) -> dict:
  """Evaluates every trained shot setting; writes WORKDIR/results.json and results.md."""
  test = common.split_features(config, workdir, "test")
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
  if common.is_writer():
    root = os.path.abspath(os.path.expanduser(workdir))
    common.write_json(os.path.join(root, "results.json"), summary)
    with open(os.path.join(root, "results.md"), "w") as f:
      f.write(results_markdown(config, workdir, results, table))
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
  for name, label in METHODS:
    cells = [f"{100 * results[s][name]['mean']:.2f} ± {100 * results[s][name]['ci95']:.2f}%"
             for s in shots]
    cells += [f"{results[s][name]['norm_ratio']:.3g}" for s in shots]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  n = results[shots[0]]["metadiff"]["n"]
  lines.append("")
  lines.append(f"{n} test episodes of {config.eval.queries} queries per class; mean ± 1.96·std/√n."
               " Norm ratio: mean norm of the classifier's prototypes over that of the "
               "class means (far above 1: the sampler diverged).")
  return "\n".join(lines)


def results_markdown(config, workdir: str, results: dict, table: str) -> str:
  """results.md: the table, what produced it, and the training curves."""
  root = os.path.abspath(os.path.expanduser(workdir))
  parts = [f"# Results: {config.data.name}, {config.backbone.name}", "", table, ""]
  for s, r in results.items():
    parts.append(f"- {s}: denoiser {r['settings']['denoiser']} (step "
                 f"{r['checkpoint']['step']}), test features {r['settings']['features']}")
  parts.append("")
  for title, rel in [("Backbone pretraining", "pretrain/curves.png")] + [
      (f"Diffusion training, {s.replace('shot', '-shot')}",
       f"{os.path.basename(train_stage.run_dir(root, int(s[:-4])))}/curves.png")
      for s in results]:
    if os.path.exists(os.path.join(root, rel)):
      parts += [f"## {title}", "", f"![{title}]({rel})", ""]
  return "\n".join(parts)
