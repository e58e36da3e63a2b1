"""Stage 3: diffusion training of the TCUNet on base-class episodes (Algorithm 1, Eq. 12).

Each step draws `episodes_per_step` N-way K-shot episodes from the base split's feature cache;
an episode's target w0 is the class means of its classes (the prototypes stage), or with the
linear head (config.denoiser.head = "linear", Table 4) the linear classifier fit on all base
images of its classes (`LinearFitTargets`); its support set conditions the denoiser, and the
loss is Eq. 12 at a random step t with fresh noise. The denoiser "w/o UNet"
(config.denoiser.unet = False) has no parameters: there is nothing to train.
The optimiser is the original's: Adam with L2 weight decay added to the gradient, and an EMA of
the parameters (copied outright for the first `ema_start_step` steps) that validation and test
use. One denoiser is trained per shot setting, in WORKDIR/train_<K>shot.

Steps run `steps_per_call` at a time inside one compiled `lax.scan`, with no host round trip
between them: episodes are drawn on the device (`episodes.draw_support`), the batch of each
step is split over the devices of the data mesh, and the parameters stay replicated. Episode b
of step s is episode s * B + b of the stream, and the noise of step s comes from
fold_in(key, s), so a run resumed from any checkpoint, or run on another number of devices,
reproduces the uninterrupted one (exactly on one device; to float rounding across device
counts, whose reductions add in another order). Every
`val_every_steps` (and at the end) the EMA parameters denoise a few hundred validation
episodes with the full sampler; the best are kept in train_<K>shot/best.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import checkpoint, heads, mesh, metrics, schedule, tcunet
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.errors import ConfigError, TrainingError
from metadiff_jax.stages import common
from metadiff_jax.stages import prototypes as prototypes_stage
from metadiff_jax.train_state import DiffusionState, adam_l2, diffusion_step


def run_dir(workdir: str, shots: int) -> str:
  return common.stage_dir(workdir, f"train_{shots}shot")


def shots_in(workdir: str) -> list[int]:
  """K of every train_<K>shot folder in the workdir, sorted (none if it does not exist)."""
  directory = os.path.expanduser(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name[6:-4]) for name in os.listdir(directory)
                if name.startswith("train_") and name.endswith("shot") and name[6:-4].isdigit())


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


def initial_state(config, feature_dim: int, shots: int):
  """(model, schedule, state at step 0) of the K-shot denoiser (no parameters w/o UNet)."""
  model = denoiser(config, feature_dim)
  ways = config.train.ways
  variables = model.init(common.key(config, "denoiser_init", shots),
                         jnp.zeros((ways, model.feature_dim)), 0,
                         jnp.zeros((ways * shots, feature_dim)),
                         jnp.repeat(jnp.arange(ways), shots))
  params = variables.get("params", {})  # none without the UNet
  t = config.train
  state = DiffusionState.create(apply_fn=model.apply, params=params,
                                tx=adam_l2(t.learning_rate, t.weight_decay),
                                # a copy: train_steps donates the state's buffers
                                ema_params=jax.tree_util.tree_map(jnp.copy, params))
  return model, schedule.from_config(config), mesh.replicate(state)


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


def stage(config, workdir: str) -> None:
  """Trains one denoiser per shot setting in config.train.shots."""
  base = common.diffusion_features(config, common.split_features(config, workdir, "train"))
  targets = prototypes_stage.diffusion_targets(config, workdir, base)
  val = common.diffusion_features(config, common.split_features(config, workdir, "val"))
  for shots in config.train.shots:
    train_shot(config, workdir, int(shots), base, targets, val)


def train_shot(config, workdir: str, shots: int, base, targets: np.ndarray, val) -> None:
  """Diffusion training of the K-shot denoiser, resumed from its latest checkpoint."""
  from metadiff_jax.stages import evaluate  # the validation metrics
  if not config.denoiser.unet:
    raise ConfigError("config.denoiser.unet = False has no parameters, so there is nothing to "
                      "train; set config.stages to skip 'train', e.g. ('eval',)")
  t = config.train
  out = run_dir(workdir, shots)
  model, sched, state = initial_state(config, base.features.shape[1], shots)
  latest = checkpoint.Checkpoints(os.path.join(out, "checkpoints"), max_to_keep=2)
  best = checkpoint.Checkpoints(os.path.join(out, "best"), max_to_keep=1)
  meta = {"best_val_accuracy": -1.0, "best_step": -1}
  try:
    state, meta = common.restore_latest(latest, state, meta, out, f"train {shots}-shot")
    step = int(state.step)
    if step >= t.steps and best.latest_step() is not None:
      logging.info("train %d-shot: done (%d steps; best validation accuracy %.4f at step %d);"
                   " skipping", shots, step, meta["best_val_accuracy"], meta["best_step"])
      return
    table = episodes_lib.class_table(base.labels)
    episodes_lib.check_support_episodes(table, t.ways, shots, "train")
    val_sampler = episodes_lib.EpisodeSampler(val.labels, t.ways, shots, t.val_queries,
                                              config.seed, "val")
    features_dev, targets_dev, table = mesh.replicate(
        (base.features, np.asarray(targets, np.float32), table))
    val_features = mesh.replicate(val.features)
    key = common.key(config, "diffusion", shots)
    episode_key = common.key(config, "episodes", shots)
    val_sched = schedule.for_sampling(config)
    sampler_options = {**evaluate.sampler_options(config), **evaluate.metric_options(config)}
    target_fn = target_function(config)
    val_key = common.key(config, "sampling", 1)
    b = t.episodes_per_step
    logging.info("train %d-shot: %d steps of %d episodes, %d base classes, D = %d", shots,
                 t.steps, b, base.num_classes, base.features.shape[1])
    writer = metrics.MetricWriter(out, enabled=common.is_writer(), resume_step=step)

    def validate_and_save(step, state, meta):
      m = evaluate.run_episodes(model, {"params": state.ema_params}, val_sched, val_features,
                                val_sampler, t.val_episodes, config.eval.batch_episodes,
                                val_key, desc=f"validate {shots}-shot", progress=False,
                                **sampler_options)
      acc, ratio = float(m["accuracy"].mean()), float(m["norm_ratio"].mean())
      proto = float(m["prototype_accuracy"].mean())
      writer.write(step, {"val_accuracy": acc, "val_norm_ratio": ratio,
                          "val_prototype_accuracy": proto})
      logging.info("train %d-shot: step %d, validation accuracy %.4f (class means %.4f), "
                   "norm ratio %.3g", shots, step, acc, proto, ratio)
      if acc > meta["best_val_accuracy"]:
        meta = dict(meta, best_val_accuracy=acc, best_step=step)
        if best.latest_step() != step:
          best.save(step, state, {"val_accuracy": acc, "norm_ratio": ratio})
      latest.save(step, state, meta)
      return meta

    if t.steps == 0:  # nothing to train: keep the initial denoiser, validated
      meta = validate_and_save(0, state, meta)
    bar = metrics.Progress(t.steps, f"train {shots}-shot", initial=step, unit="step")
    window = []  # the losses since the last logged step
    try:
      while step < t.steps:
        count = min(t.steps_per_call, t.steps - step)
        state, losses = train_steps(
            model, state, sched, features_dev, targets_dev, table, episode_key, key, count, b,
            t.ways, shots, float(t.ema_decay), int(t.ema_start_step), target_fn=target_fn)
        losses = np.asarray(losses)
        if not np.all(np.isfinite(losses)):
          bad = step + 1 + int(np.argmin(np.isfinite(losses)))
          raise TrainingError(
              f"the diffusion loss became {losses[bad - step - 1]} at step {bad}; "
              f"{latest.kept()}; lower config.train.learning_rate or check the features")
        previous, step = step, step + count
        bar.update(count, loss=f"{losses.mean():.4f}")
        crossed = lambda every: every and step // every > previous // every
        window.append(losses)
        if crossed(t.log_every_steps) or step == t.steps:
          writer.write(step, {"loss": float(np.concatenate(window).mean())})
          window = []
        if crossed(t.val_every_steps) or step == t.steps:
          meta = validate_and_save(step, state, meta)
        elif crossed(t.checkpoint_every_steps):
          latest.save(step, state, meta)
    finally:
      bar.close()
      writer.close()
  finally:
    latest.close()
    best.close()
  if common.is_writer():
    records = metrics.read_jsonl(os.path.join(out, "metrics.jsonl"))
    metrics.plot_curves(records, ["loss", "val_accuracy", "val_norm_ratio"],
                        os.path.join(out, "curves.png"),
                        title=f"diffusion training, {t.ways}-way {shots}-shot",
                        logy_keys=("loss", "val_norm_ratio"))
  logging.info("train %d-shot: done; best validation accuracy %.4f at step %d", shots,
               meta["best_val_accuracy"], meta["best_step"])
