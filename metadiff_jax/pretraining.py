"""The pretraining model and its state: the backbone with a linear head over the base classes.

Cross-entropy over every base class, the Classifier-Baseline recipe of Chen et al. 2021 (SGD
with momentum and L2 weight decay, a step learning-rate decay). A batch is drawn and augmented
on the device (`train_step`) or gathered on the host (`train_step_on_batch`); batch `s`
depends only on (seed, s). `validate` classifies a few hundred validation episodes with
class-mean prototypes. The pretrain stage (`metadiff_jax.stages.pretrain`) runs the loop;
`metadiff_jax.workdir.pretrained_backbone` restores its result into `initial_state`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metadiff_jax import embedding, evaluator, mesh, rng
from metadiff_jax.data import augment, episodes, features
from metadiff_jax.train_state import PretrainState, sgd_l2


class Classifier(nn.Module):
  """The backbone with a linear head over the base classes: logits [B, C]."""

  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes, name="head")(self.backbone(x, train=train))


def base_split_shape(config) -> tuple[tuple[int, ...], int]:
  """(image shape, image count) of the built base split, without reading its images."""
  from metadiff_jax.data import load  # imports tensorflow-datasets: only where data is read
  source = load.open_source(embedding.dataset_ref(config), "train")
  return tuple(source[0]["image"].shape), len(source)


def steps_per_epoch(config, num_images: int) -> int:
  return max(1, num_images // config.pretrain.batch_size)


def optimizer(config, steps_per_epoch_: int):
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
    image_shape, num_images = base_split_shape(config)
  if num_base is None:
    num_base = embedding.num_classes(config, "train")
  model = Classifier(embedding.backbone(config), num_base)
  # One compiled init (an eager init compiles every layer shape on its own: slow for ResNet12).
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(rng.key(config, "pretrain_init"), jnp.zeros((1, *image_shape), jnp.float32))
  tx, _ = optimizer(config, steps_per_epoch(config, num_images))
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
  module = embedding.backbone(config)
  feats = features.embed(embedding.embed_fn(module, embedding.augment_config(config)),
                         backbone_variables(state), val_data.images, p.embed_batch_size,
                         progress=progress, desc="val features")
  sampler = episodes.EpisodeSampler(val_data.labels, p.val_ways, p.val_shots, p.val_queries,
                                    config.seed, "val")
  # All the episodes in one batch (split over the devices).
  acc = evaluator.class_mean_accuracy(mesh.replicate(feats), sampler, p.val_episodes,
                                      p.val_episodes)
  return float(np.mean(acc))
