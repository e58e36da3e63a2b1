"""Diffusion training of one K-shot denoiser in a workdir (Algorithm 1, Eq. 12).

Each step draws `episodes_per_step` N-way K-shot episodes from the base split's feature cache;
an episode's target w0 is the class means of its classes (the prototypes stage), or with the
linear head (config.denoiser.head = "linear", Table 4) the linear classifier fit on all base
images of its classes (`method.LinearFitTargets`); its support set conditions the denoiser,
and the loss is Eq. 12 at a random step t with fresh noise. The denoiser "w/o UNet"
(config.denoiser.unet = False) has no parameters: there is nothing to train.
The optimiser is the original's: Adam with L2 weight decay added to the gradient, and an EMA of
the parameters (copied outright for the first `ema_start_step` steps) that validation and test
use. The denoiser of K shots is trained in WORKDIR/train_<K>shot.

Steps run `steps_per_call` at a time inside one compiled `lax.scan` (`method.train_steps`),
with no host round trip between them: episodes are drawn on the device
(`episodes.draw_support`), the batch of each step is split over the devices of the data mesh,
and the parameters stay replicated. Episode b of step s is episode s * B + b of the stream, and
the noise of step s comes from fold_in(key, s), so a run resumed from any checkpoint, or run on
another number of devices, reproduces the uninterrupted one (exactly on one device; to float
rounding across device counts, whose reductions add in another order). Every
`val_every_steps` (and at the end) the EMA parameters denoise a few hundred validation
episodes with the full sampler; the best are kept in train_<K>shot/best. The loop itself
(restore, NaN stop, logging, keeping the best) is `training_loop.run`.

The train stage runs `train_shot` for each shot setting; the analysis and stability stages for
their denoiser variants.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from metadiff_jax import checkpoint, mesh, method, rng, training_loop
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.errors import ConfigError


def train_shot(config, workdir: str, shots: int, base, targets: np.ndarray, val) -> None:
  """Diffusion training of the K-shot denoiser, resumed from its latest checkpoint."""
  if not config.denoiser.unet:
    raise ConfigError("config.denoiser.unet = False has no parameters, so there is nothing to "
                      "train; set config.stages to skip 'train', e.g. ('eval',)")
  t = config.train
  out = workdir_lib.train_dir(workdir, shots)
  metadiff = method.MetaDiff.from_config(config, base.features.shape[1])
  name = f"train {shots}-shot"
  latest = checkpoint.Checkpoints(os.path.join(out, "checkpoints"), max_to_keep=2)
  best = checkpoint.Checkpoints(os.path.join(out, "best"), max_to_keep=1)
  key = rng.key(config, "diffusion", shots)
  episode_key = rng.key(config, "episodes", shots)
  val_key = rng.key(config, "sampling", 1)

  @functools.cache
  def inputs():
    """(base features, targets, class table, validation features and sampler) on the devices:
    prepared at the first step or validation, so a run that is already done skips them."""
    table = episodes_lib.class_table(base.labels)
    episodes_lib.check_support_episodes(table, t.ways, shots, "train")
    val_sampler = episodes_lib.EpisodeSampler(val.labels, t.ways, shots, t.val_queries,
                                              config.seed, "val")
    logging.info("%s: %d steps of %d episodes, %d base classes, D = %d", name, t.steps,
                 t.episodes_per_step, base.num_classes, base.features.shape[1])
    return (*mesh.replicate((base.features, np.asarray(targets, np.float32), table,
                             val.features)), val_sampler)

  def steps(state, step, count):
    del step  # the steps draw their episodes and noise from state.step
    features_dev, targets_dev, table, _, _ = inputs()
    return metadiff.train_steps(state, features_dev, targets_dev, table, episode_key, key,
                                count, t.episodes_per_step, shots)

  def validate(step, state):
    *_, val_features, val_sampler = inputs()
    m = metadiff.evaluate({"params": state.ema_params}, val_features, val_sampler,
                          t.val_episodes, config.eval.batch_episodes, val_key, progress=False)
    acc, ratio = float(m["accuracy"].mean()), float(m["norm_ratio"].mean())
    proto = float(m["prototype_accuracy"].mean())
    logging.info("%s: step %d, validation accuracy %.4f (class means %.4f), norm ratio %.3g",
                 name, step, acc, proto, ratio)
    return training_loop.Validation(
        score=acc, metrics={"val_accuracy": acc, "val_norm_ratio": ratio,
                            "val_prototype_accuracy": proto},
        best_metadata={"val_accuracy": acc, "norm_ratio": ratio},
        best_meta={"best_step": step})

  try:
    result = training_loop.run(
        steps, metadiff.init(shots), validate, run_dir=out, name=name,
        schedule=training_loop.Schedule(
            steps=t.steps, steps_per_call=t.steps_per_call, log_every=t.log_every_steps,
            validate_every=t.val_every_steps, checkpoint_every=t.checkpoint_every_steps),
        latest=latest, best=best, meta={"best_val_accuracy": -1.0, "best_step": -1},
        loss_name="the diffusion loss",
        advice="lower config.train.learning_rate or check the features",
        plot=training_loop.Plot(("loss", "val_accuracy", "val_norm_ratio"),
                                f"diffusion training, {t.ways}-way {shots}-shot",
                                logy_keys=("loss", "val_norm_ratio")))
  finally:
    latest.close()
    best.close()
  meta = result.meta
  if not result.trained:
    logging.info("%s: done (%d steps; best validation accuracy %.4f at step %d); skipping",
                 name, int(result.state.step), meta["best_val_accuracy"], meta["best_step"])
    return
  logging.info("%s: done; best validation accuracy %.4f at step %d", name,
               meta["best_val_accuracy"], meta["best_step"])
