"""MetaDiff, the method: the denoiser, its schedules, sampler and targets, as one object.

`MetaDiff.from_config(config, feature_dim)` holds what the config says about the method: the
denoiser (a `tcunet.TCUNet` variant), the training schedule and the sampling one (possibly
respaced), the sampler's update, dtype and precision, the linear head's reference fit, the
episodes' target function and the key policy (config.seed). Its methods are the method's
steps: `init` (the train state at step 0), `loss` (Eq. 12 on a batch), `train_steps` (steps of
Algorithm 1 in one compiled `lax.scan`), `sample` (Algorithm 2's reverse process on a batch of
support sets), `classify` / `scores` (the query accuracies and scores of a batch of episodes)
and `evaluate` (`classify` over a sampler's episodes, `run_episodes`).

The compiled functions behind them (`train_steps`, `episode_metrics`, `episode_scores`, and
the diagnostics `bucket_noise_error` and `trajectory_metrics`) are module-level jits whose
static arguments are the model, the target function and the options; the object passes its
fields to them and is never a static argument itself, so the compiled programs, and the
numbers, are those of the functions alone, whether a caller holds the object or the pieces.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import (config_lib, diffusion, evaluator, heads, mesh, prototypes, rng,
                          schedule, tcunet)
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.data import features
from metadiff_jax.errors import ConfigError
from metadiff_jax.train_state import DiffusionState, adam_l2, diffusion_step


def denoiser(config, feature_dim: int) -> tcunet.TCUNet:
  """The configured TCUNet variant for features of `feature_dim` = D dimensions.

  Its `feature_dim` is the width of the head's weight rows, `heads.weight_dim(head, D)`.
  """
  d = config.denoiser
  if d.feature_dim is not None and d.feature_dim != feature_dim:
    raise ConfigError(f"config.denoiser.feature_dim = {d.feature_dim} but the backbone's "
                      f"features have {feature_dim} dimensions; leave it unset (None)")
  return tcunet.TCUNet(feature_dim=heads.weight_dim(d.head, feature_dim),
                       hidden_dims=d.hidden_dims, time_embed_dim=d.time_embed_dim,
                       loss_reduction=d.loss_reduction, head=d.head, gradient=d.gradient,
                       unet=bool(d.unet), inputs=tuple(d.inputs), prediction=d.prediction)


@dataclasses.dataclass(frozen=True)
class ClassMeanTargets:
  """Episode targets w0 for the prototype head: the class means of the episode's classes.

  A target function maps (targets [C, D], features [n, D], table, classes [B, N]) to the
  episodes' w0 [B, N, W]; frozen dataclasses, so `train_steps` can take one as a static
  argument.
  """

  def __call__(self, targets, features_dev, table, classes):
    del features_dev, table  # the prototypes stage computed the means once
    return jnp.take(targets, classes, axis=0)


@dataclasses.dataclass(frozen=True)
class LinearFitTargets:
  """Episode targets w0 for the linear head: Algorithm 1, line 3, with the linear head.

  Per episode, the N-way linear classifier [N, D + 1] fit by cross-entropy on all base images
  of the episode's classes (`heads.fit_linear`), during training: it depends on the episode's
  class combination, so it cannot be cached per class like the class means.

  Attributes:
    steps: the fit's gradient steps (config.prototypes.linear_fit_steps).
    l2: its weight penalty (config.prototypes.linear_fit_l2).
  """

  steps: int
  l2: float

  def __call__(self, targets, features_dev, table, classes):
    del targets
    members = jnp.take(table.members, classes, axis=0)  # [B, N, M], padded per class
    b, n, m = members.shape
    real = jnp.arange(m) < jnp.take(table.counts, classes, axis=0)[..., None]  # [B, N, M]
    images = jnp.take(features_dev, members.reshape(b, n * m), axis=0)  # [B, N*M, D]
    labels = jnp.repeat(jnp.arange(n, dtype=jnp.int32), m)  # class-major, like `members`
    fit = functools.partial(heads.fit_linear, ways=n, steps=self.steps, l2=self.l2)
    return jax.vmap(fit, in_axes=(0, None, 0))(images, labels, real.reshape(b, n * m))


def target_function(config):
  """The train stage's target function for config.denoiser.head."""
  if config.denoiser.head == "linear":
    p = config.prototypes
    return LinearFitTargets(int(p.linear_fit_steps), float(p.linear_fit_l2))
  return ClassMeanTargets()


@functools.partial(
    jax.jit, static_argnames=("model", "num_steps", "episodes_per_step", "ways", "shots",
                              "ema_decay", "ema_start_step", "target_fn"),
    donate_argnums=(1,))
def train_steps(model, state: DiffusionState, sched, features_dev, targets, table, episode_key,
                key, num_steps: int, episodes_per_step: int, ways: int, shots: int,
                ema_decay: float, ema_start_step: int, target_fn=ClassMeanTargets()):
  """`num_steps` optimiser steps in one `lax.scan`, episodes drawn on the device.

  Step s trains on episodes s * B, ..., s * B + B - 1 (`episodes.draw_support` from
  `episode_key`), split over the devices of the data mesh; the parameters stay replicated and
  the loss is the mean over the whole batch, so the numbers do not depend on the device count.

  Args:
    model: the TCUNet.
    state: the train state (replicated).
    sched: the schedule.
    features_dev: [n, D] base features.
    targets: [C, D] the base-class targets (class means; unused by `LinearFitTargets`).
    table: the base split's `episodes.ClassTable`.
    episode_key: the key of the training episodes.
    key: the diffusion key; step s draws t and the noise from fold_in(key, s).
    num_steps: steps in this call. episodes_per_step: B. ways: N. shots: K.
    ema_decay, ema_start_step: the EMA's decay and the steps it copies outright.
    target_fn: the episodes' targets w0 [B, N, W] from (targets, features_dev, table,
      classes [B, N]): `ClassMeanTargets()` or `LinearFitTargets(steps, l2)`.

  Returns:
    (state, losses [num_steps]).
  """
  labels = jnp.broadcast_to(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), shots),
                            (episodes_per_step, ways * shots))
  draw = jax.vmap(episodes_lib.draw_support, in_axes=(None, None, 0, None, None))

  def one_step(state, _):
    index = state.step * episodes_per_step + jnp.arange(episodes_per_step)
    idx, classes = mesh.constrain(draw(table, episode_key, index, ways, shots))
    support = jnp.take(features_dev, idx, axis=0)  # [B, N*K, D]
    w0 = target_fn(targets, features_dev, table, classes)  # [B, N, W]
    return diffusion_step(model, state, sched, w0, support, labels, key, ema_decay,
                          ema_start_step)

  return jax.lax.scan(one_step, state, None, length=num_steps)


def sampler_options(config) -> dict:
  """The sampler's dtype, matmul precision and update (config.diffusion.sampler) from
  config.diffusion, as `run_episodes` and `episode_metrics` take them."""
  d = config.diffusion
  return {"dtype": jnp.bfloat16 if d.sampler_dtype == "bfloat16" else None,
          "precision": None if d.sampler_precision == "default" else d.sampler_precision,
          "update": d.sampler}


def episode_w_T(key, index, ways: int, dim: int):
  """[B, N, W] starting weights w_T ~ N(0, I) of episodes `index`, w_T of episode i drawn from
  fold_in(key, i): every row and diagnostic of episode i starts from the same draw."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (ways, dim)))(index)


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
  support, query, w0, protos = sampled_weights(
      model, variables, sched, features_dev, support_idx, support_labels, query_idx, index,
      key, ways, dtype, precision, update)

  def accuracy(w, head):
    return jax.vmap(functools.partial(heads.accuracy, head))(w, query, query_labels)

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


def sampled_weights(model, variables, sched, features_dev, support_idx, support_labels,
                     query_idx, index, key, ways, dtype, precision, update):
  """(support, query, sampled weights w0, class means) of a batch of episodes: what
  `episode_metrics` and `episode_scores` score."""
  head = getattr(model, "head", "prototype")
  support, query = features.gather(features_dev, support_idx, query_idx)
  dim = heads.weight_dim(head, features_dev.shape[-1])
  w_T = episode_w_T(key, index, ways, dim)
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
  _, query, w0, protos = sampled_weights(
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


def _on_devices(feature_set):
  """The features of a `features.FeatureSet` replicated on the devices; an array that is
  already there as it is."""
  if isinstance(feature_set, features.FeatureSet):
    return mesh.replicate(feature_set.features)
  return feature_set


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
    linear_fit = linear_fit or default_linear_fit()
  else:
    linear_fit = None  # unused: one compiled program whatever the caller passes
  features_dev = _on_devices(feature_set)
  return evaluator.evaluate_episodes(
      lambda e: episode_metrics(model, variables, sched, features_dev, e.support,
                                e.support_labels, e.query, e.query_labels, e.index, key,
                                sampler.ways, dtype=dtype, precision=precision,
                                linear_fit=linear_fit, update=update),
      sampler, count, batch, desc=desc, progress=progress)


def noise_error_table(model, variables, sched, feature_set, targets, sampler, count: int,
                      batch: int, key, buckets: int = 10) -> dict:
  """`bucket_noise_error` over episodes 0..count-1 of `sampler`, averaged per range.

  Args:
    feature_set: the split's `features.FeatureSet`, or its features already on the devices;
      targets: [C, W] its class targets.
    sampler: an `episodes.EpisodeSampler` of the split.

  Returns:
    {"steps": [[lo, hi), ...], "model", "zero", "support_means": [buckets] means, "n"}.
  """
  features_dev = _on_devices(feature_set)
  targets_dev = mesh.replicate(np.asarray(targets))
  # bucket_noise_error's values are [buckets, B]: episodes on the leading axis for the evaluator.
  parts = evaluator.evaluate_episodes(
      lambda e: {name: value.T for name, value in bucket_noise_error(
          model, variables, sched, features_dev, targets_dev, e.support, e.support_labels,
          e.classes, e.index, key, sampler.ways, buckets).items()},
      sampler, count, batch)
  T = sched.num_steps
  edges = [round(j * T / buckets) for j in range(buckets + 1)]
  out = {name: np.ascontiguousarray(v.T, np.float64).mean(1).tolist()
         for name, v in parts.items()}
  return {"steps": [[edges[j], edges[j + 1]] for j in range(buckets)], "n": count, **out}


@functools.partial(jax.jit, static_argnames=("model", "ways", "every", "update"))
def trajectory_metrics(model, variables, sched, features_dev, support_idx, support_labels,
                       query_idx, query_labels, index, key, ways: int, every: int,
                       update: str = "original"):
  """Query accuracy, support loss and weight norm of each episode along the reverse trajectory.

  The sampler is `episode_metrics`'s (w_T of episode i from fold_in(key, i); `update` the
  reverse update, config.diffusion.sampler), keeping the weights every `every` steps.

  Returns:
    A dict of [B, K // every + 1] arrays, entry j after j * every reverse steps (the last is
    the sampler's output): "accuracy", "support_loss" (mean over the support set) and "norm"
    (the mean norm of the weights' rows); and "reference_norm" [B], that of the support class
    means, and "w0" [B, N, W], the output.
  """
  support, query = features.gather(features_dev, support_idx, query_idx)
  head = getattr(model, "head", "prototype")
  w_T = episode_w_T(key, index, ways, model.feature_dim)
  w0, trajectory = diffusion.sample_batch(model, variables, sched, w_T, support,
                                          support_labels, trajectory_every=every,
                                          sampler=update,
                                          noise_keys=episode_noise_keys(key, index))

  def per_episode(traj, s, s_labels, q, q_labels):
    acc = jax.vmap(lambda w: heads.accuracy(head, w, q, q_labels))(traj)
    loss = jax.vmap(lambda w: heads.support_loss(head, w, s, s_labels, "mean"))(traj)
    return acc, loss

  acc, loss = jax.vmap(per_episode)(trajectory, support, support_labels, query, query_labels)
  means = jax.vmap(prototypes.class_means, (0, 0, None))(support, support_labels, ways)
  return {"accuracy": acc, "support_loss": loss,
          "norm": jnp.mean(jnp.linalg.norm(trajectory, axis=-1), axis=-1),
          "reference_norm": jnp.mean(jnp.linalg.norm(means, axis=-1), axis=-1), "w0": w0}


def default_linear_fit() -> tuple[int, float]:
  """The linear head's norm-ratio reference fit (steps, l2) of the default config."""
  return metric_options(config_lib.base_config())["linear_fit"]


def variant_settings(config) -> dict:
  """The denoiser variant (it keys the cached per-shot results: w/o UNet has no parameters
  to fingerprint, and the linear head's norm ratio depends on its reference fit)."""
  d = config.denoiser
  out = {"head": d.head, "gradient": d.gradient, "unet": bool(d.unet),
         "inputs": list(d.inputs), "prediction": d.prediction,
         "feature_rms": config.diffusion.feature_rms}
  if d.head == "linear":
    out["linear_fit"] = list(metric_options(config)["linear_fit"])
  return out


def sampler_settings(config) -> dict:
  """What of the sampler can change its results (it keys the cached per-shot results)."""
  d = config.diffusion
  return {"num_sampling_steps": d.num_sampling_steps or d.num_steps,
          "dtype": d.sampler_dtype, "precision": d.sampler_precision, "update": d.sampler}


@dataclasses.dataclass(frozen=True, eq=False)
class MetaDiff:
  """The method as the config defines it, for features of one dimension D.

  Attributes:
    model: the denoiser (`denoiser`).
    feature_dim: D, the features' dimension (the model's weight rows are wider with the
      linear head: `heads.weight_dim`).
    train_schedule: the training schedule (`schedule.from_config`), T steps.
    sample_schedule: the sampler's (`schedule.for_sampling`: possibly respaced).
    sampler: the sampler's {"dtype", "precision", "update"} (`sampler_options`).
    linear_fit: (steps, l2) of the linear head's norm-ratio reference (`metric_options`).
    target_fn: the episodes' targets w0 (`target_function`).
    ways: N of the training episodes (config.train.ways).
    learning_rate, weight_decay: the optimiser's (Adam with L2 added to the gradient).
    ema_decay, ema_start_step: the EMA of the parameters that validation and test use.
    seed: the run's seed; `key` derives every key of the method from it (`rng`).
  """

  model: tcunet.TCUNet
  feature_dim: int
  train_schedule: schedule.Schedule
  sample_schedule: schedule.Schedule
  sampler: dict
  linear_fit: tuple[int, float]
  target_fn: Any
  ways: int
  learning_rate: float
  weight_decay: float
  ema_decay: float
  ema_start_step: int
  seed: int

  @classmethod
  def from_config(cls, config, feature_dim: int) -> "MetaDiff":
    """The method of `config` for features of `feature_dim` = D dimensions."""
    t = config.train
    return cls(model=denoiser(config, feature_dim), feature_dim=int(feature_dim),
               train_schedule=schedule.from_config(config),
               sample_schedule=schedule.for_sampling(config), sampler=sampler_options(config),
               linear_fit=metric_options(config)["linear_fit"],
               target_fn=target_function(config), ways=int(t.ways),
               learning_rate=t.learning_rate, weight_decay=t.weight_decay,
               ema_decay=float(t.ema_decay), ema_start_step=int(t.ema_start_step),
               seed=config.seed)

  def key(self, purpose: str, *fold: int) -> jax.Array:
    """The key of `purpose` (`rng.KEY_TAGS`) under the run's seed, integers folded in."""
    return rng.seed_key(self.seed, purpose, *fold)

  def init(self, shots: int) -> DiffusionState:
    """The K-shot denoiser's train state at step 0, replicated (no parameters w/o UNet)."""
    model, ways = self.model, self.ways
    variables = model.init(self.key("denoiser_init", shots),
                           jnp.zeros((ways, model.feature_dim)), 0,
                           jnp.zeros((ways * shots, self.feature_dim)),
                           jnp.repeat(jnp.arange(ways), shots))
    params = variables.get("params", {})  # none without the UNet
    state = DiffusionState.create(apply_fn=model.apply, params=params,
                                  tx=adam_l2(self.learning_rate, self.weight_decay),
                                  # a copy: train_steps donates the state's buffers
                                  ema_params=jax.tree_util.tree_map(jnp.copy, params))
    return mesh.replicate(state)

  def loss(self, variables, w0, support, support_labels, key):
    """Eq. 12 on a batch (`diffusion.loss`, t and eps drawn from `key`)."""
    return diffusion.loss(self.model, variables, self.train_schedule, w0, support,
                          support_labels, key)

  def train_steps(self, state, features_dev, targets, table, episode_key, key, num_steps: int,
                  episodes_per_step: int, shots: int):
    """`num_steps` steps of Algorithm 1 in one compiled call (`train_steps`)."""
    return train_steps(self.model, state, self.train_schedule, features_dev, targets, table,
                       episode_key, key, num_steps, episodes_per_step, self.ways, shots,
                       self.ema_decay, self.ema_start_step, target_fn=self.target_fn)

  def sample(self, variables, w_T, support, support_labels, noise_keys=None):
    """Algorithm 2 on a batch: w0 [B, N, W] from w_T [B, N, W] and the support sets
    [B, N*K, D] (`diffusion.sample_batch` with the sampling schedule and options)."""
    return diffusion.sample_batch(self.model, variables, self.sample_schedule, w_T, support,
                                  support_labels, dtype=self.sampler["dtype"],
                                  precision=self.sampler["precision"],
                                  sampler=self.sampler["update"], noise_keys=noise_keys)

  def classify(self, variables, features_dev, episodes: episodes_lib.Episodes, key,
               ways: int) -> dict:
    """Per-episode metrics of a batch of N-way episodes of `features_dev` [n, D]
    (`episode_metrics`: accuracy, prototype_accuracy, norm_ratio, support_loss, each [B]);
    w_T of episode i comes from fold_in(key, i)."""
    linear_fit = self.linear_fit if self.model.head == "linear" else None
    return episode_metrics(self.model, variables, self.sample_schedule, features_dev,
                           episodes.support, episodes.support_labels, episodes.query,
                           episodes.query_labels, episodes.index, key, ways,
                           dtype=self.sampler["dtype"], precision=self.sampler["precision"],
                           linear_fit=linear_fit, update=self.sampler["update"])

  def evaluate(self, variables, features_dev, sampler: episodes_lib.EpisodeSampler, count: int,
               batch: int, key, *, desc: str = "episodes",
               progress: bool = True) -> dict[str, np.ndarray]:
    """`classify` on episodes 0..count-1 of `sampler`, `batch` at a time over the data mesh
    (`evaluator.evaluate_episodes`): {"accuracy", ...} as [count] host arrays; `features_dev`
    [n, D] on the devices (`mesh.replicate`)."""
    return evaluator.evaluate_episodes(
        lambda e: self.classify(variables, features_dev, e, key, sampler.ways), sampler,
        count, batch, desc=desc, progress=progress)

  def trajectory_every(self, every: int) -> int:
    """The reverse steps between trajectory points: `every`, or 1 where it does not divide
    the sampler's steps."""
    return every if self.sample_schedule.num_steps % every == 0 else 1

  def trajectory(self, variables, features_dev, sampler: episodes_lib.EpisodeSampler,
                 count: int, batch: int, key, every: int, *, desc: str = "trajectory",
                 progress: bool = False) -> tuple[int, dict[str, np.ndarray]]:
    """`trajectory_metrics` on episodes 0..count-1 of `sampler` over the data mesh.

    Returns:
      (every, metrics): the reverse steps between points (`trajectory_every`), and
      {"accuracy", "support_loss", "norm", "norm_ratio" (norm over reference_norm): [count, P];
      "reference_norm": [count]} host arrays.
    """
    sched = self.sample_schedule
    every = self.trajectory_every(every)

    def points(e):
      m = trajectory_metrics(self.model, variables, sched, features_dev, e.support,
                             e.support_labels, e.query, e.query_labels, e.index, key,
                             ways=sampler.ways, every=every, update=self.sampler["update"])
      return {"accuracy": m["accuracy"], "support_loss": m["support_loss"], "norm": m["norm"],
              "reference_norm": m["reference_norm"],
              "norm_ratio": m["norm"] / m["reference_norm"][:, None]}

    return every, evaluator.evaluate_episodes(points, sampler, count, batch, desc=desc,
                                              progress=progress)

  def scores(self, variables, features_dev, episodes: episodes_lib.Episodes, key,
             ways: int) -> dict:
    """Per-query scores of a batch of episodes (`episode_scores`)."""
    return episode_scores(self.model, variables, self.sample_schedule, features_dev,
                          episodes.support, episodes.support_labels, episodes.query,
                          episodes.index, key, ways, dtype=self.sampler["dtype"],
                          precision=self.sampler["precision"], update=self.sampler["update"])
