"""Stage 1: pretrain the embedding network on all base classes (Section 4.2).

Cross-entropy over every base class with a linear head on the backbone's features, the
Classifier-Baseline recipe of Chen et al. 2021 (SGD with momentum and L2 weight decay, a step
learning-rate decay). The base split sits on the device as uint8 when it fits and each batch is
drawn and augmented there (`augment.draw_batch`); batch `s` depends only on (seed, s), so a
resumed run sees the batches an uninterrupted one would. After each epoch the backbone embeds
the validation split and class-mean prototypes classify a few hundred 5-way episodes of it; the
backbone of the best epoch is kept in `pretrain/best` for the later stages.

With `config.backbone.checkpoint` set, the stage imports that PyTorch backbone instead.
"""

from __future__ import annotations

import functools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metadiff_jax import checkpoint, mesh, metrics
from metadiff_jax.data import augment, episodes, features
from metadiff_jax.errors import TrainingError
from metadiff_jax.stages import common
from metadiff_jax.train_state import PretrainState, sgd_l2


class Classifier(nn.Module):
  """The backbone with a linear head over the base classes: logits [B, C]."""

  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes, name="head")(self.backbone(x, train=train))


def _base_split_shape(config) -> tuple[tuple[int, ...], int]:
  """(image shape, image count) of the built base split, without reading its images."""
  from metadiff_jax.data import load
  source = load.open_source(common.dataset_ref(config), "train")
  return tuple(source[0]["image"].shape), len(source)


def steps_per_epoch(config, num_images: int) -> int:
  return max(1, num_images // config.pretrain.batch_size)


def _optimizer(config, steps_per_epoch_: int):
  p = config.pretrain
  schedule = optax.piecewise_constant_schedule(
      p.learning_rate, {int(e) * steps_per_epoch_: p.lr_decay_factor for e in p.lr_decay_epochs})
  return sgd_l2(schedule, p.momentum, p.weight_decay), schedule


def initial_state(config, image_shape=None, num_images: int | None = None,
                  num_base: int | None = None) -> PretrainState:
  """The state at step 0 (also the template that checkpoints are restored into).

  The image shape, image count and base-class count come from the built dataset unless
  given (`import_torch` gives them where no dataset is built).
  """
  if image_shape is None or num_images is None:
    image_shape, num_images = _base_split_shape(config)
  if num_base is None:
    num_base = common.num_classes(config, "train")
  model = Classifier(common.backbone(config), num_base)
  # One compiled init (an eager init compiles every layer shape on its own: slow for ResNet12).
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(common.key(config, "pretrain_init"), jnp.zeros((1, *image_shape), jnp.float32))
  tx, _ = _optimizer(config, steps_per_epoch(config, num_images))
  state = PretrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                               batch_stats=variables.get("batch_stats", {}))
  return mesh.replicate(state)


def backbone_variables(state) -> dict:
  """The backbone's own variables out of the classifier's: of a `PretrainState`, or of the
  nested dict that a checkpoint of one restores to without a template
  (`checkpoint.read_latest`)."""
  if isinstance(state, dict):
    params, stats = state["params"], state.get("batch_stats")
  else:
    params, stats = state.params, state.batch_stats
  out = {"params": params["backbone"]}
  if stats and "backbone" in stats:
    out["batch_stats"] = stats["backbone"]
  return out


def with_backbone(state: PretrainState, variables: dict) -> PretrainState:
  """`state` with its backbone's variables replaced by `variables` (an imported backbone)."""
  params = dict(state.params, backbone=variables["params"])
  stats = dict(state.batch_stats or {})
  if "batch_stats" in variables:
    stats["backbone"] = variables["batch_stats"]
  return state.replace(params=params, batch_stats=stats)


@functools.partial(jax.jit, static_argnames=("batch_size", "aug"), donate_argnums=(0,))
def train_step(state: PretrainState, images, labels, data_key, dropout_key, batch_size: int,
               aug: augment.AugmentConfig):
  """One SGD step on batch `state.step` of the split (images [n, H, W, C] uint8 on device).

  The split is replicated on every device; the drawn batch is split over the data mesh, so
  each device augments and runs its share, and BatchNorm and the loss see the whole batch.
  """
  x, y = mesh.constrain(augment.draw_batch(images, labels, data_key, state.step, batch_size,
                                           aug))
  return _sgd_step(state, x, y, dropout_key)


@functools.partial(jax.jit, static_argnames=("aug",), donate_argnums=(0,))
def train_step_on_batch(state: PretrainState, images, labels, data_key, dropout_key,
                        aug: augment.AugmentConfig):
  """One SGD step on batch `state.step` gathered on the host (uint8 [B, H, W, C], split over
  the data mesh), augmented here exactly as `train_step` augments it."""
  x = augment.augment_batch(augment.augment_key(data_key, state.step), images, aug)
  return _sgd_step(state, mesh.constrain(x), labels, dropout_key)


def _sgd_step(state, x, y, dropout_key):
  rng = jax.random.fold_in(dropout_key, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (updates, jnp.mean(jnp.argmax(logits, -1) == y))

  (loss, (updates, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
  return state, {"loss": loss, "accuracy": acc}


def validate(config, state: PretrainState, val_data, progress: bool = False) -> float:
  """Mean query accuracy of class-mean prototypes on the validation episodes (fast check)."""
  p = config.pretrain
  module = common.backbone(config)
  feats = features.embed(common.embed_fn(module, common.augment_config(config)),
                         backbone_variables(state), val_data.images, p.embed_batch_size,
                         progress=progress, desc="val features")
  sampler = episodes.EpisodeSampler(val_data.labels, p.val_ways, p.val_shots, p.val_queries,
                                    config.seed, "val")
  eps = sampler.batch(0, p.val_episodes)
  acc = common.prototype_accuracy(jnp.asarray(feats), eps.support, eps.support_labels,
                                  eps.query, eps.query_labels, p.val_ways)
  return float(np.mean(np.asarray(acc)))


def stage(config, workdir: str) -> None:
  """Pretrains (or imports) the backbone; keeps the best one in WORKDIR/pretrain/best."""
  out = common.stage_dir(workdir, "pretrain")
  latest = checkpoint.Checkpoints(os.path.join(out, "checkpoints"), max_to_keep=2)
  best = checkpoint.Checkpoints(os.path.join(out, "best"), max_to_keep=1)
  try:
    if config.backbone.checkpoint:
      _import(config, best)
      return
    _train(config, out, latest, best)
  finally:
    latest.close()
    best.close()


def _import(config, best: checkpoint.Checkpoints) -> None:
  path = os.path.abspath(os.path.expanduser(config.backbone.checkpoint))
  if best.latest_step() is not None and best.metadata().get("imported_from") == path:
    logging.info("pretrain: backbone already imported from %s; skipping", path)
    return
  image_shape, num_images = _base_split_shape(config)
  state = initial_state(config, image_shape, num_images)
  state = with_backbone(state, common.import_backbone(config, backbone_variables(state)))
  step = (best.latest_step() or 0) + 1
  best.save(step, state, {"imported_from": path, "done": True,
                          "image_shape": [int(d) for d in image_shape]})
  logging.info("pretrain: imported the backbone from %s", path)


def _train(config, out: str, latest: checkpoint.Checkpoints, best: checkpoint.Checkpoints):
  p = config.pretrain
  train_data = common.load_split(config, "train")
  n = len(train_data.images)
  if p.batch_size > n:
    raise TrainingError(f"config.pretrain.batch_size {p.batch_size} exceeds the {n} base "
                        "images; lower it")
  per_epoch = steps_per_epoch(config, n)
  total = p.epochs * per_epoch
  image_shape = [int(d) for d in train_data.images.shape[1:]]
  state = initial_state(config, image_shape, n)
  meta = {"best_val_accuracy": -1.0, "best_epoch": -1}
  state, meta = common.restore_latest(latest, state, meta, out, "pretrain")
  if int(state.step) >= total and best.latest_step() is not None:
    logging.info("pretrain: done (best validation accuracy %.4f at epoch %d); skipping",
                 meta["best_val_accuracy"], meta["best_epoch"])
    return
  if total == 0:  # no training asked for: keep the initial backbone
    best.save(0, state, {"val_accuracy": None, "epoch": 0, "image_shape": image_shape})
    latest.save(0, state, meta)
    return

  aug = common.augment_config(config)
  data_key = common.key(config, "pretrain_data")
  dropout_key = common.key(config, "pretrain_dropout")
  on_device = augment.fits_on_device(train_data.images, config.data.device_memory_fraction)
  if on_device:
    images, labels = mesh.replicate((train_data.images, train_data.labels))
  logging.info("pretrain: %d base images of %d classes, %d steps per epoch, %d epochs, batches "
               "drawn %s", n, train_data.num_classes, per_epoch, p.epochs,
               "on device" if on_device else "on the host")
  _, lr_schedule = _optimizer(config, per_epoch)
  val_data = common.load_split(config, "val")
  writer = metrics.MetricWriter(out, enabled=common.is_writer(), resume_step=int(state.step))
  window: list[dict] = []  # the metrics of the steps since the last log, still on device
  step = int(state.step)
  bar = metrics.Progress(total, "pretrain", initial=step, unit="step",
                         enabled=common.is_writer())

  def host_batch(step):
    idx = np.asarray(augment.batch_indices(data_key, step, n, p.batch_size))
    return mesh.shard_rows(p.batch_size, lambda a, b: (train_data.images[idx[a:b]],
                                                      train_data.labels[idx[a:b]]))

  def flush(step) -> dict:
    """The mean metrics of the window (one host sync), after a check for a NaN loss."""
    nonlocal window
    fetched = jax.device_get(window)
    values = {k: np.asarray([w[k] for w in fetched], np.float64) for k in fetched[0]}
    bad = np.flatnonzero(~np.isfinite(values["loss"]))
    if bad.size:
      raise TrainingError(
          f"the pretraining loss became {values['loss'][bad[0]]} at step "
          f"{step - len(window) + bad[0] + 1}; {latest.kept()}; lower "
          "config.pretrain.learning_rate")
    window = []
    return {k: float(v.mean()) for k, v in values.items()}

  try:
    while step < total:
      # No host sync per step: the metrics stay on the device until the next log line, so
      # the host dispatches ahead and the device never waits for it.
      if on_device:
        state, m = train_step(state, images, labels, data_key, dropout_key, p.batch_size, aug)
      else:
        x, y = host_batch(step)
        state, m = train_step_on_batch(state, x, y, data_key, dropout_key, aug)
      step += 1
      window.append(m)
      epoch_end = step % per_epoch == 0
      save_due = bool(p.checkpoint_every_steps) and step % p.checkpoint_every_steps == 0
      if step % p.log_every_steps == 0 or epoch_end or save_due or step == total:
        logged = flush(step)
        logged["learning_rate"] = float(lr_schedule(step - 1))
        writer.write(step, logged)
        bar.update(0, loss=f"{logged['loss']:.3f}")
      bar.update(1)
      if epoch_end:
        epoch = step // per_epoch
        val_acc = validate(config, state, val_data)
        writer.write(step, {"val_accuracy": val_acc, "epoch": epoch})
        logging.info("pretrain: epoch %d/%d, validation %d-way %d-shot accuracy %.4f", epoch,
                     p.epochs, p.val_ways, p.val_shots, val_acc)
        if val_acc > meta["best_val_accuracy"]:
          meta = dict(meta, best_val_accuracy=val_acc, best_epoch=epoch)
          if best.latest_step() != step:
            best.save(step, state, {"val_accuracy": val_acc, "epoch": epoch,
                                    "image_shape": image_shape})
        latest.save(step, state, meta)
      elif save_due:
        latest.save(step, state, meta)
  finally:
    bar.close()
    writer.close()
  _plot(out)
  logging.info("pretrain: done; best validation accuracy %.4f at epoch %d",
               meta["best_val_accuracy"], meta["best_epoch"])


def _plot(out: str) -> None:
  if common.is_writer():
    records = metrics.read_jsonl(os.path.join(out, "metrics.jsonl"))
    metrics.plot_curves(records, ["loss", "accuracy", "val_accuracy"],
                        os.path.join(out, "curves.png"), title="backbone pretraining")
