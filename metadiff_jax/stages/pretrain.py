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

import numpy as np

from metadiff_jax import checkpoint, embedding, mesh, pretraining, rng, training_loop
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import augment
from metadiff_jax.errors import TrainingError


def stage(config, workdir: str) -> None:
  """Pretrains (or imports) the backbone; keeps the best one in WORKDIR/pretrain/best."""
  out = workdir_lib.stage_dir(workdir, "pretrain")
  latest = checkpoint.Checkpoints(os.path.join(out, "checkpoints"), max_to_keep=2)
  best = checkpoint.Checkpoints(workdir_lib.backbone_dir(workdir), max_to_keep=1)
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
  image_shape, num_images = pretraining.base_split_shape(config)
  state = pretraining.initial_state(config, image_shape, num_images)
  imported = embedding.import_backbone(config, pretraining.backbone_variables(state))
  state = pretraining.with_backbone(state, imported)
  step = (best.latest_step() or 0) + 1
  best.save(step, state, {"imported_from": path, "done": True,
                          "image_shape": [int(d) for d in image_shape]})
  logging.info("pretrain: imported the backbone from %s", path)


def _train(config, out: str, latest: checkpoint.Checkpoints, best: checkpoint.Checkpoints):
  p = config.pretrain
  train_data = embedding.load_split(config, "train")
  n = len(train_data.images)
  if p.batch_size > n:
    raise TrainingError(f"config.pretrain.batch_size {p.batch_size} exceeds the {n} base "
                        "images; lower it")
  per_epoch = pretraining.steps_per_epoch(config, n)
  total = p.epochs * per_epoch
  image_shape = [int(d) for d in train_data.images.shape[1:]]
  state = pretraining.initial_state(config, image_shape, n)
  meta = {"best_val_accuracy": -1.0, "best_epoch": -1}
  if total == 0 and best.latest_step() is None:  # no training asked for: keep the initial one
    best.save(0, state, {"val_accuracy": None, "epoch": 0, "image_shape": image_shape})
    latest.save(0, state, meta)
    return

  aug = embedding.augment_config(config)
  data_key = rng.key(config, "pretrain_data")
  dropout_key = rng.key(config, "pretrain_dropout")
  _, lr_schedule = pretraining.optimizer(config, per_epoch)

  @functools.cache
  def inputs():
    """(the split on the devices or None, the validation split): read at the first step, so
    a run that is already done skips them."""
    on_device = augment.fits_on_device(train_data.images, config.data.device_memory_fraction)
    logging.info("pretrain: %d base images of %d classes, %d steps per epoch, %d epochs, "
                 "batches drawn %s", n, train_data.num_classes, per_epoch, p.epochs,
                 "on device" if on_device else "on the host")
    split = mesh.replicate((train_data.images, train_data.labels)) if on_device else None
    return split, embedding.load_split(config, "val")

  def steps(state, step, count):
    """One step (count is 1): its metrics stay on the device until the loop syncs, so the
    host dispatches ahead and the device never waits for it."""
    del count
    split = inputs()[0]
    if split is not None:
      return pretraining.train_step(state, *split, data_key, dropout_key, p.batch_size, aug)
    idx = np.asarray(augment.batch_indices(data_key, step, n, p.batch_size))
    x, y = mesh.shard_rows(p.batch_size, lambda a, b: (train_data.images[idx[a:b]],
                                                       train_data.labels[idx[a:b]]))
    return pretraining.train_step_on_batch(state, x, y, data_key, dropout_key, aug)

  def validate(step, state):
    epoch = step // per_epoch
    val_acc = pretraining.validate(config, state, inputs()[1])
    logging.info("pretrain: epoch %d/%d, validation %d-way %d-shot accuracy %.4f", epoch,
                 p.epochs, p.val_ways, p.val_shots, val_acc)
    return training_loop.Validation(
        score=val_acc, metrics={"val_accuracy": val_acc, "epoch": epoch},
        best_metadata={"val_accuracy": val_acc, "epoch": epoch, "image_shape": image_shape},
        best_meta={"best_epoch": epoch})

  result = training_loop.run(
      steps, state, validate, run_dir=out, name="pretrain",
      schedule=training_loop.Schedule(steps=total, steps_per_call=1, log_every=p.log_every_steps,
                                      validate_every=per_epoch,
                                      checkpoint_every=p.checkpoint_every_steps),
      latest=latest, best=best, meta=meta, loss_name="the pretraining loss",
      advice="lower config.pretrain.learning_rate",
      log_extra=lambda step: {"learning_rate": float(lr_schedule(step - 1))},
      plot=training_loop.Plot(("loss", "accuracy", "val_accuracy"), "backbone pretraining"))
  meta = result.meta
  if not result.trained:
    logging.info("pretrain: done (best validation accuracy %.4f at epoch %d); skipping",
                 meta["best_val_accuracy"], meta["best_epoch"])
    return
  logging.info("pretrain: done; best validation accuracy %.4f at epoch %d",
               meta["best_val_accuracy"], meta["best_epoch"])
