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

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import (checkpoint, config_lib, diffusion, heads, mesh, metrics, prototypes,
                          schedule)
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.data import features
from metadiff_jax.errors import ConfigError, StageError, UserError
from metadiff_jax.stages import common
from metadiff_jax.stages import train as train_stage

METHODS = (("metadiff", "MetaDiff (trained TCUNet, EMA)"),
           ("untrained", "Same sampler, untrained TCUNet"),
           ("prototypes", "Class-mean prototypes (ProtoNet-style)"))


def sampler_options(config) -> dict:
  """The sampler's dtype, matmul precision and update (config.diffusion.sampler) from
  config.diffusion, as `run_episodes` and `episode_metrics` take them."""
  d = config.diffusion
  return {"dtype": jnp.bfloat16 if d.sampler_dtype == "bfloat16" else None,
          "precision": None if d.sampler_precision == "default" else d.sampler_precision,
          "update": d.sampler}


def episode_noise_keys(key, index):
  """[B] keys of the "ddpm" sampler's noise in episodes `index` (w_T is drawn from
  fold_in(key, i); the noise from fold_in(fold_in(key, i), 1))."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), 1))(index)


def metric_options(config) -> dict:
  """The linear head's norm-ratio reference fit, (steps, l2), as `run_episodes` takes it."""
  p = config.prototypes
  return {"linear_fit": (int(p.linear_fit_steps), float(p.linear_fit_l2))}


@functools.partial(jax.jit, static_argnames=("model", "ways", "dtype", "precision",
                                             "linear_fit", "update"))
def episode_metrics(model, variables, sched, features_dev, support_idx, support_labels,
                    query_idx, query_labels, index, key, ways: int, dtype=None, precision=None,
                    linear_fit=None, update="original"):
  """Per-episode metrics of sampled and class-mean prototypes (or sampled linear heads).

  The episode axis of the inputs may be split over the devices of the data mesh; every
  per-episode quantity is then computed where its episode lives.

  Args:
    model: the TCUNet; its `head` ("prototype" if it has none) says what the weights are;
      variables: its variables; sched: the sampling schedule (possibly respaced,
      `schedule.for_sampling`).
    features_dev: [n, D] the split's features.
    support_idx, support_labels: [B, N*K]; query_idx, query_labels: [B, N*Q] (`Episodes`).
    index: [B] episode indices (w_T of episode i comes from fold_in(key, i)).
    key: the sampling key.
    ways: N.
    dtype, precision: the sampler's computation dtype and matmul precision.
    update: the reverse update, "original", "ddpm" or "ddim" (`diffusion.sample_batch`'s
      `sampler`; config.diffusion.sampler).
    linear_fit: (steps, l2) of the linear head's norm-ratio reference (`metric_options`);
      unused by the prototype head.

  Returns:
    {"accuracy", "prototype_accuracy", "norm_ratio", "support_loss"}: each [B]. accuracy and
    support_loss (mean over the support set) are those of the model's head; the norm ratio
    compares with the class means (prototype head) or the support-set fit (linear head).
  """
  head = getattr(model, "head", "prototype")
  support, query, w0, protos = _sampled_weights(
      model, variables, sched, features_dev, support_idx, support_labels, query_idx, index,
      key, ways, dtype, precision, update)

  def accuracy(w, head):
    logits = heads.logits(head, w, query)
    return jnp.mean(jnp.argmax(logits, -1) == query_labels, axis=-1)

  def mean_norm(w):
    return jnp.mean(jnp.linalg.norm(w, axis=-1), axis=-1)

  if head == "prototype":
    reference = protos
  else:
    if linear_fit is None:
      raise ValueError("the linear head's metrics need linear_fit=(steps, l2), e.g. "
                       "**metric_options(config)")
    steps, l2 = linear_fit
    fit = lambda s, y: heads.fit_linear(s, y, jnp.ones(y.shape, bool), ways, steps, l2)
    reference = jax.vmap(fit)(support, support_labels)
  loss = jax.vmap(lambda w, s, y: heads.support_loss(head, w, s, y, "mean"))(
      w0, support, support_labels)
  return {"accuracy": accuracy(w0, head), "prototype_accuracy": accuracy(protos, "prototype"),
          "norm_ratio": mean_norm(w0) / mean_norm(reference), "support_loss": loss}


def _sampled_weights(model, variables, sched, features_dev, support_idx, support_labels,
                     query_idx, index, key, ways, dtype, precision, update):
  """(support, query, sampled weights w0, class means) of a batch of episodes: what
  `episode_metrics` and `episode_scores` score."""
  head = getattr(model, "head", "prototype")
  support, query = features.gather(features_dev, support_idx, query_idx)
  dim = heads.weight_dim(head, features_dev.shape[-1])
  w_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (ways, dim)))(index)
  w0 = diffusion.sample_batch(model, variables, sched, w_T, support, support_labels,
                              dtype=dtype, precision=precision, sampler=update,
                              noise_keys=episode_noise_keys(key, index))
  protos = jax.vmap(prototypes.class_means, (0, 0, None))(support, support_labels, ways)
  return support, query, w0, protos


@functools.partial(jax.jit, static_argnames=("model", "ways", "dtype", "precision", "update"))
def episode_scores(model, variables, sched, features_dev, support_idx, support_labels,
                   query_idx, index, key, ways: int, dtype=None, precision=None,
                   update="original"):
  """The per-query class scores behind `episode_metrics`' accuracies (same arguments).

  An accuracy is a count of arg-maxes, so two computations whose scores differ only by
  rounding can disagree on a query whose two best scores nearly tie; these scores give each
  query's margin (docs/SCALING.md: how layouts compare).

  Returns:
    {"scores": [B, N*Q, N] the model head's logits of the sampled weights,
     "prototype_scores": [B, N*Q, N] those of the class means (10 x cosine),
     "weights": [B, N, W] the sampled weights, "prototypes": [B, N, D] the class means}.
  """
  head = getattr(model, "head", "prototype")
  _, query, w0, protos = _sampled_weights(
      model, variables, sched, features_dev, support_idx, support_labels, query_idx, index,
      key, ways, dtype, precision, update)
  return {"scores": heads.logits(head, w0, query),
          "prototype_scores": heads.logits("prototype", protos, query),
          "weights": w0, "prototypes": protos}


@functools.partial(jax.jit, static_argnames=("model", "ways", "buckets"))
def bucket_noise_error(model, variables, sched, features_dev, targets_dev, support_idx,
                       support_labels, classes, index, key, ways: int, buckets: int):
  """Held-out diffusion error per range of steps: a divergence diagnostic.

  Each episode's clean weights are the targets of its classes (for held-out classes, their
  means over all the split's images, as the prototypes stage computes for base classes); for
  each of `buckets` equal ranges of the training schedule's [0, T) it is noised at a step t
  drawn in the range (w_t = sqrt(abar_t) w0 + sqrt(1 - abar_t) eps), and the model's noise
  estimate is compared with eps (`diffusion.noise_error`: always in noise space, so a model
  that predicts x0 compares too). Beside it, two fixed predictors on the same draws:
  "zero", eps_hat = 0 (its error is the mean of eps^2, about 1), and "support_means", the
  exact noise were w0 the support class means m_hat, eps_hat = (w_t - sqrt(abar_t) m_hat) /
  sqrt(1 - abar_t): what a denoiser that knew m_hat and nothing else would say.

  Args:
    model, variables: the denoiser. sched: the training schedule (T steps).
    features_dev: [n, D] the split's features. targets_dev: [C, W] its class targets.
    support_idx, support_labels: [B, N*K] (`Episodes`). classes: [B, N] split classes.
    index: [B] episode indices: episode i's draws come from fold_in(key, i).
    ways: N. buckets: the number of step ranges.

  Returns:
    {"model", "zero", "support_means"}: each [buckets, B] mean squared noise error.
  """
  support = jnp.take(features_dev, support_idx, axis=0)
  w0 = jnp.take(targets_dev, classes, axis=0)  # [B, N, W]
  T = sched.num_steps
  edges = [round(j * T / buckets) for j in range(buckets + 1)]
  lo = jnp.asarray(edges[:-1], jnp.int32)
  hi = jnp.asarray(edges[1:], jnp.int32)
  means = jax.vmap(prototypes.class_means, (0, 0, None))(support, support_labels, ways)

  def draws(i, j):
    t_key, noise_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), j))
    t = jax.random.randint(t_key, (), lo[j], jnp.maximum(hi[j], lo[j] + 1))
    return t, jax.random.normal(noise_key, w0.shape[1:])

  out = {"model": [], "zero": [], "support_means": []}
  for j in range(buckets):
    t, noise = jax.vmap(lambda i: draws(i, j))(index)
    out["model"].append(diffusion.noise_error(model, variables, sched, w0, support,
                                              support_labels, t, noise))
    out["zero"].append(jnp.mean(jnp.square(noise), axis=(-2, -1)))
    w_t = diffusion.q_sample(sched, w0, t, noise)
    scale = sched.sqrt_alphas_cumprod[t][:, None, None]
    sigma = sched.sqrt_one_minus_alphas_cumprod[t][:, None, None]
    if means.shape[-1] == w0.shape[-1]:  # the prototype head: m_hat is a guess of w0
      guess = (w_t - scale * means) / sigma
      out["support_means"].append(jnp.mean(jnp.square(guess - noise), axis=(-2, -1)))
    else:
      out["support_means"].append(jnp.full(t.shape, jnp.nan))
  return {k: jnp.stack(v) for k, v in out.items()}


def noise_error_table(model, variables, sched, feature_set, targets, sampler, count: int,
                      batch: int, key, buckets: int = 10) -> dict:
  """`bucket_noise_error` over episodes 0..count-1 of `sampler`, averaged per range.

  Args:
    feature_set: the split's `features.FeatureSet`; targets: [C, W] its class targets.
    sampler: an `episodes.EpisodeSampler` of the split.

  Returns:
    {"steps": [[lo, hi), ...], "model", "zero", "support_means": [buckets] means, "n"}.
  """
  features_dev, targets_dev = mesh.replicate((feature_set.features, np.asarray(targets)))
  batch = mesh.padded_size(min(batch, count))
  parts: dict[str, list] = {}
  for start in range(0, count, batch):
    def rows(a, b):
      eps = sampler.batch(start + a, b - a)
      return eps.support, eps.support_labels, eps.classes, eps.index.astype(np.int32)
    support, labels, classes, index = mesh.shard_rows(batch, rows)
    m = bucket_noise_error(model, variables, sched, features_dev, targets_dev, support, labels,
                           classes, index, key, sampler.ways, buckets)
    keep = min(batch, count - start)
    for name, value in m.items():
      parts.setdefault(name, []).append(np.asarray(mesh.to_host(value))[:, :keep])
  T = sched.num_steps
  edges = [round(j * T / buckets) for j in range(buckets + 1)]
  out = {name: np.concatenate(v, axis=1).astype(np.float64).mean(1).tolist()
         for name, v in parts.items()}
  return {"steps": [[edges[j], edges[j + 1]] for j in range(buckets)], "n": count, **out}


def run_episodes(model, variables, sched, feature_set, sampler: episodes_lib.EpisodeSampler,
                 count: int, batch: int, key, desc: str = "episodes", progress: bool = True,
                 dtype=None, precision=None, linear_fit=None,
                 update: str = "original") -> dict[str, np.ndarray]:
  """Metrics of episodes 0..count-1 of `sampler`, `batch` at a time ([count] arrays).

  `feature_set` is a `features.FeatureSet` or its features already on the devices
  (`mesh.replicate`). Each batch is rounded up to a multiple of the device count and split
  over the data mesh; each process draws only the episodes its devices hold. `linear_fit`
  (steps, l2) sets the linear head's norm-ratio reference (`metric_options`); None there
  takes config_lib's defaults.
  """
  if getattr(model, "head", "prototype") == "linear":
    linear_fit = linear_fit or _default_linear_fit()
  else:
    linear_fit = None  # unused: one compiled program whatever the caller passes
  if isinstance(feature_set, features.FeatureSet):
    features_dev = mesh.replicate(feature_set.features)
  else:
    features_dev = feature_set
  batch = mesh.padded_size(min(batch, count))
  out: dict[str, list] = {}

  with metrics.Progress(count, desc, unit="episode",
                        enabled=progress and common.is_writer()) as bar:
    for start in range(0, count, batch):
      # A full batch (compiled once), trimmed below.
      support, support_labels, query, query_labels, index = common.sharded_episodes(
          sampler, start, batch)
      m = episode_metrics(model, variables, sched, features_dev, support, support_labels,
                          query, query_labels, index, key, sampler.ways, dtype=dtype,
                          precision=precision, linear_fit=linear_fit, update=update)
      keep = min(batch, count - start)
      for name, value in m.items():
        out.setdefault(name, []).append(mesh.to_host(value)[:keep])
      bar.update(keep)
  return {name: np.concatenate(parts) for name, parts in out.items()}


def summarize(values: np.ndarray) -> dict[str, float]:
  """mean, the 95% half-width 1.96 std / sqrt(n) (population std), and n."""
  values = np.asarray(values, np.float64)
  n = len(values)
  return {"mean": float(values.mean()), "ci95": float(1.96 * values.std() / np.sqrt(n)),
          "n": n}


CHECKPOINT_LABELS = {"best": "best-validated checkpoint", "last": "last checkpoint"}


def kept_steps(workdir: str, shots: int) -> dict[str, list[int]]:
  """The steps of the K-shot denoiser kept in train_<K>shot: {"best": [...] (its
  best-validated one), "checkpoints": [...] (the latest few)}, ascending; none where a folder
  is missing."""
  run_dir = train_stage.run_dir(workdir, shots)
  out = {}
  for name in ("best", "checkpoints"):
    directory = os.path.join(run_dir, name)
    out[name] = []
    if os.path.isdir(directory):  # not opened otherwise: opening creates the folder
      with checkpoint.Checkpoints(directory, max_to_keep=None) as store:
        out[name] = store.all_steps()
  return out


def _checkpoint_location(workdir: str, shots: int, which) -> tuple[str, int | None]:
  """(folder, step) of the checkpoint that `which` ("best", "last" or a step) names; step
  None: the folder's latest. A StageError if there is none, a ConfigError for a step that
  is not kept."""
  run_dir = train_stage.run_dir(workdir, shots)
  steps = kept_steps(workdir, shots)
  if which in ("best", "last"):
    folder = "best" if which == "best" else "checkpoints"
    if which == "last" and not steps[folder] and steps["best"]:
      raise ConfigError(f"config.eval.checkpoint = 'last': {run_dir} keeps no training "
                        f"checkpoints, only best/ (step {steps['best'][-1]}; an imported "
                        "denoiser, or its checkpoints/ were removed); evaluate it with "
                        "config.eval.checkpoint = 'best'")
    if not steps[folder]:
      raise StageError(f"no trained {shots}-shot denoiser in {run_dir}/{folder}; run the train "
                       f"stage first (--config.stages=\"('train', 'eval')\") with "
                       f"config.train.shots including {shots}")
    return os.path.join(run_dir, folder), None
  for folder in ("checkpoints", "best"):
    if which in steps[folder]:
      return os.path.join(run_dir, folder), which
  if not steps["checkpoints"] and not steps["best"]:
    raise StageError(f"config.eval.checkpoint = {which}: {run_dir} holds no trained {shots}-shot "
                     "denoiser; run the train stage first (--config.stages=\"('train', 'eval')\")")
  kept = ", ".join(str(s) for s in steps["checkpoints"]) or "none"
  best = ", ".join(str(s) for s in steps["best"]) or "none"
  raise ConfigError(f"config.eval.checkpoint = {which}: no {shots}-shot checkpoint of step "
                    f"{which} in {run_dir}; it keeps steps {kept} in checkpoints/ and {best} in "
                    "best/: set config.eval.checkpoint to one of them, 'best' or 'last'")


def load_denoiser(config, workdir: str, shots: int, feature_dim: int, which="best"):
  """(model, trained state, state at initialisation, checkpoint metadata) of the K-shot
  denoiser, or a UserError naming what to do.

  Args:
    which: "best" (kept in train_<K>shot/best), "last" (the latest in train_<K>shot/checkpoints)
      or a step kept in either (config_lib.eval_checkpoint).

  Without the UNet (config.denoiser.unet = False) the denoiser has no parameters: no
  checkpoint is read, both states are the empty initial one and the metadata is {}.
  """
  if not config.denoiser.unet:
    model, _, state = train_stage.initial_state(config, feature_dim, shots)
    return model, state, state, {}
  directory, step = _checkpoint_location(workdir, shots, which)
  model, _, init_state = train_stage.initial_state(config, feature_dim, shots)
  store = checkpoint.Checkpoints(directory, max_to_keep=None)  # None: a reader deletes nothing
  try:
    state, meta = store.restore(init_state, step)
  except checkpoint.CheckpointMismatchError as err:
    raise StageError(f"the {shots}-shot denoiser in {directory} does not fit the config: "
                     f"{err.detail}; evaluate with the config it was trained with") from None
  except checkpoint.UnreadableCheckpointError as err:
    raise StageError(f"the {shots}-shot denoiser in {directory} cannot be read: {err.detail};"
                     " evaluate another one (config.eval.checkpoint) or move "
                     f"{train_stage.run_dir(workdir, shots)} aside and retrain it") from None
  except UserError:
    raise
  except ValueError as err:
    raise StageError(f"the denoiser in {directory} does not fit the config ("
                     f"{str(err).splitlines()[0]}); evaluate with the config it was "
                     "trained with") from None
  finally:
    store.close()
  # A denoiser that trained to NaN is stopped before it is saved, so non-finite parameters
  # here are a damaged file; sampling with them would report chance as an accuracy.
  bad = sum(int(np.sum(~np.isfinite(np.asarray(leaf))))
            for leaf in jax.tree_util.tree_leaves(state.ema_params))
  if bad:
    raise StageError(f"the {shots}-shot denoiser in {directory}/{int(state.step)} has {bad} NaN "
                     "or infinite parameters (a damaged checkpoint); evaluate another one "
                     "(config.eval.checkpoint = 'best', 'last' or a kept step) or retrain it")
  return model, state, init_state, meta


def _companion(config, workdir: str, shots: int, which, step: int) -> str | None:
  """Which checkpoint the results report beside the evaluated one: the last one, or where
  that is the one evaluated, the best-validated one (None if it is not kept, or w/o UNet)."""
  if not config.denoiser.unet:
    return None
  steps = kept_steps(workdir, shots)
  last = max(steps["checkpoints"], default=None)
  evaluated_last = which == "last" or (which != "best" and step == last)
  if evaluated_last:
    return "best" if steps["best"] else None
  return "last" if steps["checkpoints"] else None


def row_summary(run: dict) -> dict:
  """The results row of one sampler's `run_episodes` metrics: accuracy (mean, ci95, n), mean
  norm ratio and support loss, and how many episodes diverged (their sampled weights are not
  finite, so their norm ratio is NaN or infinite and their accuracy is a tie-break, not a
  measurement)."""
  ratio = np.asarray(run["norm_ratio"])
  return {**summarize(run["accuracy"]), "norm_ratio": float(ratio.mean()),
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
  model, state, init_state, meta = load_denoiser(config, workdir, shots, dim, which)
  fingerprint = features.variables_fingerprint(state.ema_params)
  companion = _companion(config, workdir, shots, which, int(state.step))
  if companion is not None:
    other = load_denoiser(config, workdir, shots, dim, companion)[1]
    other_fingerprint = features.variables_fingerprint(other.ema_params)
  settings = {"ways": e.ways, "shots": shots, "queries": e.queries, "episodes": e.episodes,
              "diagnostics": [e.diagnostic_episodes, e.diagnostic_buckets],
              "seed": config.seed, "denoiser": fingerprint, "features": test.key,
              "sampler": _sampler_settings(config), "variant": _variant_settings(config),
              "checkpoint": [which, int(state.step)]}
  if companion is not None:
    settings[f"{companion}_checkpoint"] = [int(other.step), other_fingerprint]
  cached = os.path.join(common.stage_dir(workdir, "eval"), f"{shots}shot.json")
  if os.path.exists(cached):
    with open(cached) as f:
      previous = json.load(f)
    if previous.get("settings") == settings:
      logging.info("eval: %d-shot results for this denoiser already in %s; skipping", shots,
                   cached)
      return previous
  key = common.key(config, "sampling", 2)
  sched = schedule.for_sampling(config)
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
    runs[name] = run_episodes(model, {"params": params}, sched, features_dev, sampler,
                              e.episodes, e.batch_episodes, key,
                              desc=f"eval {shots}-shot {name}", **sampler_options(config),
                              **metric_options(config))
  diagnostics = {}
  if e.diagnostic_episodes and model.head == "prototype":
    targets = np.asarray(features.class_means(test.features, test.labels, test.num_classes))
    count = min(int(e.diagnostic_episodes), e.episodes)
    errors = {}
    for name, params in (("metadiff", state.ema_params), ("untrained", init_state.params)):
      errors[name] = noise_error_table(model, {"params": params}, schedule.from_config(config),
                                       test, targets, sampler, count, e.batch_episodes,
                                       common.key(config, "sampling", 3),
                                       int(e.diagnostic_buckets))
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
      "prototypes": {**summarize(runs["metadiff"]["prototype_accuracy"]), "norm_ratio": 1.0,
                     "support_loss": None},
  }
  if companion is not None:
    result[f"metadiff_{companion}"] = {**row_summary(runs[f"metadiff_{companion}"]),
                                       "step": int(other.step)}
  for name, label in _sampled_rows(result):
    r = result[name]
    if r["diverged"]:
      logging.warning("eval %d-shot: %s diverged in %d of %d episodes (non-finite sampled "
                      "weights)", shots, label, r["diverged"], r["n"])
  if common.is_writer():
    common.write_json(cached, result)
  return result


def stage(config, workdir: str) -> dict:
  """Evaluates every trained shot setting; writes WORKDIR/results.json and results.md."""
  test = common.diffusion_features(config, common.split_features(config, workdir, "test"))
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
  if common.is_writer():
    print(table, flush=True)
  return summary


def _default_linear_fit() -> tuple[int, float]:
  p = config_lib.base_config().prototypes
  return int(p.linear_fit_steps), float(p.linear_fit_l2)


def _variant_settings(config) -> dict:
  """The denoiser variant (it keys the cached per-shot results: w/o UNet has no parameters
  to fingerprint, and the linear head's norm ratio depends on its reference fit)."""
  d = config.denoiser
  out = {"head": d.head, "gradient": d.gradient, "unet": bool(d.unet),
         "inputs": list(d.inputs), "prediction": d.prediction,
         "feature_rms": config.diffusion.feature_rms}
  if d.head == "linear":
    out["linear_fit"] = list(metric_options(config)["linear_fit"])
  return out


def _sampler_settings(config) -> dict:
  """What of the sampler can change its results (it keys the cached per-shot results)."""
  d = config.diffusion
  return {"num_sampling_steps": d.num_sampling_steps or d.num_steps,
          "dtype": d.sampler_dtype, "precision": d.sampler_precision, "update": d.sampler}


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
       f"{os.path.basename(train_stage.run_dir(root, int(s[:-4])))}/curves.png")
      for s in results]:
    if os.path.exists(os.path.join(root, rel)):
      parts += [f"## {title}", "", f"![{title}]({rel})", ""]
  return "\n".join(parts)
