"""Shared pieces of the pipeline's configs: the base config, presets, and generic checks.

A file `configs/<name>.py` defines `get_config(arg=None)`: it starts from `base_config(...)`,
changes what its dataset and backbone need, and returns `finalize(config, arg)`, which applies
presets given after a colon on the command line (`--config=configs/x.py:shot=1`; `tiny=1`
shrinks every stage to seconds) and locks the config so that a misspelt field
(`--config.train.stpes=5`) fails loudly.

Sections: `data` (the built dataset and its augmentations), `backbone`, `pretrain`,
`prototypes` (the diffusion targets), `diffusion` (the schedule), `denoiser` (the TCUNet),
`train` (diffusion training), `eval`, `analysis`, `stability`, and `stages` (which stages run,
in order).

The defaults are plain values: this module imports no model module, so that the config sits
below the model. `check` holds the checks that need none; `metadiff_jax.checks.check` runs it
with those of the modules that own the other values.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import inspect
import json
import math
import os
import sys
import traceback

import ml_collections
from ml_collections import config_dict

from metadiff_jax.data.spec import AUGMENTATIONS
from metadiff_jax.errors import ConfigError, UserError

# The pipeline's stages, in the order they run by default; "analysis" (the paper's analyses,
# `stages.analysis`) and "stability" (the stability study, `stages.stability`) run only where
# config.stages names them.
STAGES = ("pretrain", "prototypes", "train", "eval")
OPTIONAL_STAGES = ("analysis", "stability")
ANALYSIS_PARTS = ("table2", "table3", "table4", "fig4", "fig5")
# The rows of the analysis tables (`stages.analysis.TABLES`): the reference, the baselines of
# Table 2, and MetaDiff with its ablations of Tables 3-4.
ANALYSIS_ROWS = ("class_means", "gda", "gda_momentum", "anil", "metalstm", "alfa", "metadiff",
                 "cosine_ce", "no_unet", "linear_alfa", "linear_metadiff")
DTYPES = ("float32", "bfloat16")
PRECISIONS = ("default", "high", "highest")

# The original method's settings of the fields the stabilised variants change
# (docs/STABILITY.md): the TCUNet reads the support-loss gradient alone and predicts the noise
# (Eq. 12), the sampler is the original's deterministic update (Eq. 8) over all T steps, and
# the features are diffused as the backbone gives them.
ORIGINAL = {"denoiser.inputs": ("gradient",), "denoiser.prediction": "eps",
            "denoiser.loss_reduction": "sum", "diffusion.sampler": "original",
            "diffusion.feature_rms": None, "diffusion.num_sampling_steps": None}
# The fields of weights_normalized_shot_mean, which the x0-prediction variants build on.
_STABLE = {"denoiser.inputs": ("gradient", "weights"), "diffusion.feature_rms": 1.0,
           "denoiser.loss_reduction": "shot_mean"}
# Named variants, each the original with a few of those fields changed; `variant=NAME` after
# a config file's colon applies one. "faithful" is the original method.
VARIANTS = {
    "faithful": {},
    "ddpm": {"diffusion.sampler": "ddpm"},
    "ddim": {"diffusion.sampler": "ddim"},
    "weights": {"denoiser.inputs": ("gradient", "weights")},
    "means": {"denoiser.inputs": ("gradient", "means")},
    "weights_means": {"denoiser.inputs": ("gradient", "weights", "means")},
    "normalized": {"diffusion.feature_rms": 1.0},
    "mean_gradient": {"denoiser.loss_reduction": "mean"},
    "weights_normalized": {"denoiser.inputs": ("gradient", "weights"),
                           "diffusion.feature_rms": 1.0},
    "weights_normalized_mean": {"denoiser.inputs": ("gradient", "weights"),
                                "diffusion.feature_rms": 1.0,
                                "denoiser.loss_reduction": "mean"},
    "weights_normalized_shot_mean": dict(_STABLE),
    "x0": {"denoiser.prediction": "x0"},
    "x0_weights": {"denoiser.prediction": "x0", "denoiser.inputs": ("gradient", "weights")},
    # x0 = the support class means plus the network's correction.
    "residual": {**_STABLE, "denoiser.prediction": "x0_residual"},
    # x0 = a learned linear map of the support class means plus the network's correction,
    # sampled in 10 respaced steps (the default), or in all T.
    "linear_prior": {**_STABLE, "denoiser.prediction": "x0_linear_prior",
                     "diffusion.num_sampling_steps": 10},
    "linear_prior_full": {**_STABLE, "denoiser.prediction": "x0_linear_prior"},
}
# The variant every config starts from (docs/STABILITY.md says why).
RECOMMENDED = "linear_prior"

# The `tiny` preset (`:tiny=1`): every stage shrunk to seconds, on the build named "tiny" (the
# tests build 40 glyph classes of 20 images of 16 x 16: `python -m metadiff_jax.data build
# glyphs --config tiny --num_classes 40 --images_per_class 20 --image_size 16`). The tests,
# the notebook's TINY run and CI use it to show that the pipeline runs, not what it reaches.
TINY = {
    "data.builder_config": "tiny",
    "pretrain.epochs": 2, "pretrain.batch_size": 32, "pretrain.val_episodes": 20,
    "pretrain.log_every_steps": 5,
    "diffusion.num_steps": 10,
    "denoiser.hidden_dims": (32, 16),
    "train.shots": (1,), "train.steps": 20, "train.steps_per_call": 5,
    "train.val_every_steps": 10, "train.val_episodes": 10, "train.log_every_steps": 5,
    "train.checkpoint_every_steps": 5, "train.ema_start_step": 5,
    "eval.episodes": 20, "eval.batch_episodes": 8,
}


def set_fields(config, fields: dict) -> None:
  """Sets each "section.name" of `fields` in `config` to its value."""
  for field, value in fields.items():
    section, key = field.split(".")
    config[section][key] = value


def apply_variant(config, name: str) -> None:
  """Sets the fields of `ORIGINAL` to those of the named variant (`VARIANTS`)."""
  if name not in VARIANTS:
    raise ConfigError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
  set_fields(config, {**ORIGINAL, **VARIANTS[name]})


def apply_tiny(config) -> None:
  """Shrinks every stage of `config` to seconds (`TINY`, the `tiny=1` preset)."""
  set_fields(config, TINY)


def variant_of(config) -> str | None:
  """The name of the variant `config` is, or None if its fields match none."""
  current = {f: _plain(config[f.split(".")[0]][f.split(".")[1]]) for f in ORIGINAL}
  for name, fields in VARIANTS.items():
    if current == {f: _plain(v) for f, v in {**ORIGINAL, **fields}.items()}:
      return name
  return None


def _plain(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def base_config(dataset: str = "glyphs", backbone: str = "conv4") -> ml_collections.ConfigDict:
  """The full config with the paper's and the original code's defaults, unlocked.

  Args:
    dataset: the `data.name` (a builder of `python -m metadiff_jax.data build`).
    backbone: "conv4", "resnet12" or "resnet12_wide".
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Which stages run, in order; each skips what its checkpoint says is already done.
  config.stages = STAGES

  config.data = ml_collections.ConfigDict(dict(
      name=dataset, data_dir="~/tensorflow_datasets",
      builder_config=config_dict.placeholder(str),  # None: the build named "default"
      # Pretraining augmentations (`AUGMENTATIONS[name]`); mean/std None take the dataset's
      # normalisation constants.
      augment=ml_collections.ConfigDict(dict(AUGMENTATIONS[dataset],
                                             mean=config_dict.placeholder(tuple),
                                             std=config_dict.placeholder(tuple))),
      # Hold the pretraining split on the accelerator as uint8 when it takes at most this
      # fraction of its memory; otherwise batches are gathered on the host.
      device_memory_fraction=0.5))

  config.backbone = ml_collections.ConfigDict(dict(
      name=backbone,
      # A PyTorch ResNet12 state dict (.pth, or .npz of its tensors) to use instead of
      # pretraining; the pretrain stage imports it and stops there.
      checkpoint=config_dict.placeholder(str),
      # Meta-Baseline's ResNet12 activates after the fourth block's sum, the original's does not.
      activate_last=False,
      dropblock_rate=config_dict.placeholder(float),  # None: the backbone's own
      # Computation dtype of pretraining and feature extraction ("float32" or "bfloat16");
      # parameters, batch statistics and the loss stay float32 either way.
      compute_dtype="float32"))

  # Backbone pretraining: cross-entropy over all base classes with a linear head, the
  # Classifier-Baseline recipe (Chen et al. 2021; its miniImageNet setting below).
  config.pretrain = ml_collections.ConfigDict(dict(
      epochs=100, batch_size=128, learning_rate=0.1, momentum=0.9,
      weight_decay=5e-4,  # L2 added to the gradient, as PyTorch's SGD does
      lr_decay_epochs=(90,), lr_decay_factor=0.1,
      # After each epoch: a few-shot check on the validation split with class-mean prototypes;
      # the backbone of the best epoch is kept.
      val_ways=5, val_shots=1, val_queries=15, val_episodes=500,
      log_every_steps=50,
      checkpoint_every_steps=1000,  # and at every epoch's end
      embed_batch_size=256))

  # The diffusion targets w0 (Algorithm 1, line 3): per base class, the mean feature over all
  # its images. 0 passes: clean images (the default); n > 0: the mean over n passes of
  # augmented images (the original used one augmented pass).
  config.prototypes = ml_collections.ConfigDict(dict(
      augmented_passes=0,
      # With the linear head (denoiser.head = "linear") an episode's target w0 is instead the
      # N-way linear classifier fit, during diffusion training, by cross-entropy on all base
      # images of the episode's classes (`heads.fit_linear`: Nesterov steps from zero, step size
      # 1 / curvature bound, penalty l2 * ||W||^2 on the weights, not the bias). Chosen on random
      # ReLU features like Conv4's (D = 256, 5 classes of 20 images, three class separations,
      # 8 episodes each): with l2 = 1e-2, 400 steps bring the objective within 0.4-0.6% of its
      # 20,000-step optimum, and doubling them changes it by < 0.2% (100 steps: 1.6-3.6% off);
      # held-out accuracy is the same (+-0.01) for l2 from 1e-3 to 1e-2, and 1e-3 needs 800 steps.
      linear_fit_steps=400, linear_fit_l2=1e-2))

  # Section 4.2: DDPM's linear schedule, beta from 1e-4 to 0.02 over T = 1000 steps.
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear",  # or "cosine"
      num_steps=1000, beta_start=1e-4, beta_end=0.02,
      # Sampling (validation and evaluation). num_sampling_steps K < num_steps respaces the
      # reverse process to K of the T steps (Nichol & Dhariwal 2021); None runs all T. The
      # denoiser's layers compute in sampler_dtype ("float32" or "bfloat16"; the weights being
      # denoised stay float32) with matmul precision sampler_precision ("default", "high" or
      # "highest"); docs/PERFORMANCE.md measures what each changes.
      num_sampling_steps=config_dict.placeholder(int),
      sampler_dtype="float32", sampler_precision="default",
      # The reverse update (docs/STABILITY.md): "original" (Eq. 8 as the original code runs it,
      # no noise), "ddpm" (the same plus sigma_t z, sigma_t^2 = beta_t) or "ddim" (eta = 0).
      sampler="original",
      # None: diffuse the features as the backbone gives them. r > 0: rescale every feature
      # vector (support, query and base images, so the class-mean targets too) to root-mean-square
      # coordinate r, norm r sqrt(D), before diffusion and classification.
      feature_rms=config_dict.placeholder(float)))

  # Section 4.3: the TCUNet. feature_dim None: the backbone's D; hidden_dims None: (W/2, W/4)
  # for weight rows of width W (D, or D + 1 for the linear head).
  config.denoiser = ml_collections.ConfigDict(dict(
      feature_dim=config_dict.placeholder(int), hidden_dims=config_dict.placeholder(tuple),
      time_embed_dim=320,
      loss_reduction="sum",  # the original code; "mean" is Eq. 11 as printed
      # The variants of Tables 3 and 4 (see `tcunet`). head: the base learner whose weights are
      # diffused, "prototype" (the paper's; targets are class means) or "linear" (Table 4; targets
      # from prototypes.linear_fit_*, queries scored by W f + b, and the network is fed the
      # gradient of its cross-entropy support loss). gradient, for the prototype head: "l2"
      # (Eq. 11) or "cosine_ce" (Table 3 ii: the support set's cross-entropy under the 10 x
      # cosine query classifier). unet = False (Table 3 iii, "w/o UNet"): eps = the gradient, with
      # no parameters to train; run it with stages that skip "train".
      head="prototype", gradient="l2", unet=True,
      # Stabilised variants (docs/STABILITY.md). inputs: what the TCUNet's first block reads,
      # ("gradient",) in the original, with "weights" (w_t) and/or "means" (the support class
      # means) added. prediction: "eps" (Eq. 12), "x0" (the network outputs w_0), "x0_residual"
      # (w_0 = the support class means + the network's correction) or "x0_linear_prior" (w_0 = a
      # learned linear map of them + the correction; prototype head only, see `tcunet`).
      inputs=("gradient",), prediction="eps"))

  # Diffusion training (Algorithm 1, Eq. 12), one denoiser per shot setting; defaults are the
  # original's: Adam 1e-4 with PyTorch-style L2 5e-4, 8 episodes a step, EMA 0.9999 copied
  # outright for the first 2,000 steps; the paper trains 30 epochs x 10,000 iterations.
  config.train = ml_collections.ConfigDict(dict(
      shots=(1, 5), ways=5, steps=300_000, episodes_per_step=8,
      learning_rate=1e-4, weight_decay=5e-4, ema_decay=0.9999, ema_start_step=2000,
      # Optimiser steps per compiled call (a lax.scan), so the host is not visited every step.
      steps_per_call=100,
      log_every_steps=1000, checkpoint_every_steps=10_000,
      # Validation with the EMA parameters and the full sampler; the best is kept.
      val_every_steps=10_000, val_episodes=300, val_queries=15))

  # Episodic evaluation on the test split: MetaDiff, the same sampler with an untrained
  # denoiser, and class-mean prototypes, on the same episodes, mean +- 1.96 std / sqrt(n).
  config.eval = ml_collections.ConfigDict(dict(
      shots=config_dict.placeholder(tuple),  # None: train.shots
      ways=5, queries=15, episodes=600,
      batch_episodes=100,  # episodes per compiled sampler call
      # Divergence diagnostic (prototype head): the held-out noise error of the trained and the
      # untrained denoiser in each of diagnostic_buckets ranges of steps, on the first
      # diagnostic_episodes test episodes (0: skip it).
      diagnostic_episodes=200, diagnostic_buckets=10,
      # Which denoiser the MetaDiff row evaluates: "best" (the best-validated one,
      # train_<K>shot/best), "last" (the latest in train_<K>shot/checkpoints) or a step kept there
      # (an int). The results add the last checkpoint's row beside the best one (or the best's
      # beside the last), so a sampler that diverges late in training shows. Any type, so that
      # both --config.eval.checkpoint=last and =3000 parse.
      checkpoint=config_dict.FieldReference("best", field_type=object)))

  # The paper's analyses (the optional "analysis" stage, configs/paper_analysis.py): Tables
  # 2-4 and Figures 4-5 on the eval stage's test episodes (eval.ways, eval.queries).
  config.analysis = ml_collections.ConfigDict(dict(
      # What to produce: any of table2, table3, table4, fig4, fig5.
      parts=ANALYSIS_PARTS,
      # Which rows of those tables to compute (any of ANALYSIS_ROWS); None: every row. A row
      # left out prints as "—".
      rows=config_dict.placeholder(tuple),
      shots=config_dict.placeholder(tuple),  # None: the eval stage's shots
      episodes=config_dict.placeholder(int),  # test episodes; None: eval.episodes
      batch_episodes=100,
      # The baselines' inner loop: steps at meta-training and test time (ANIL, MetaLSTM, ALFA),
      # and the std of the Gaussian initial weights (GDA, momentum GDA, ALFA; MetaDiff's w_T is
      # N(0, I) too).
      inner_steps=10, init_std=1.0,
      # GDA and momentum GDA have nothing to meta-train: learning rate and step count are picked
      # on validation episodes from this grid (the choice is written into table2.md).
      gda_learning_rates=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3), gda_steps=(1, 3, 10, 30, 100),
      gda_momentum=0.9,
      # Bi-level meta-training of ANIL, MetaLSTM and ALFA on base episodes of `queries` queries a
      # class: Adam on the query cross-entropy, through the unrolled inner loop.
      meta_steps=10_000, meta_episodes_per_step=8, meta_learning_rate=1e-3, queries=15,
      steps_per_call=50, log_every_steps=100, val_every_steps=1000, val_episodes=300,
      # Training steps of the ablation denoisers (Tables 3-4); None: train.steps.
      denoiser_steps=config_dict.placeholder(int),
      # Figure 4: inner-loop step counts whose training-step memory is measured.
      memory_inner_steps=(5, 10, 20, 40, 80),
      # Figure 5: reverse steps between the points of the convergence curve.
      trajectory_every=10))

  # The stability study (the optional "stability" stage, configs/stability.py): each variant
  # (`VARIANTS`) trained on the pipeline's features for `steps` steps (None: train.steps) and
  # measured on the eval stage's test episodes; the lr_variants also at learning_rates, the
  # length_variants also trained for each of `lengths` steps.
  config.stability = ml_collections.ConfigDict(dict(
      variants=("faithful", "ddpm", "ddim", "weights", "means", "normalized", "mean_gradient",
                "x0", "x0_weights", "weights_normalized", "weights_normalized_mean",
                "weights_normalized_shot_mean", "residual", "linear_prior",
                "linear_prior_full"),
      shots=config_dict.placeholder(tuple),  # None: the eval stage's shots
      episodes=config_dict.placeholder(int),  # None: eval.episodes
      steps=config_dict.placeholder(int),
      # How the study's denoisers are validated and checkpointed (None: as train.* says), kept
      # here so that the study never changes the record of the train stage's own denoisers.
      val_every_steps=config_dict.placeholder(int),
      checkpoint_every_steps=config_dict.placeholder(int),
      val_episodes=config_dict.placeholder(int),
      learning_rates=(1e-3,),
      lr_variants=("faithful", "weights_normalized", "weights_normalized_shot_mean"),
      lengths=(), length_variants=(RECOMMENDED,),
      # Beside class means, the closed-form linear shrinkage of the support means (a ridge
      # regression of the base classes' means on their K-shot support means, penalty
      # shrinkage_l2 times the number of draws; `prototypes.fit_linear_shrinkage`) from
      # shrinkage_draws support sets per base class.
      shrinkage_draws=20, shrinkage_l2=1e-3,
      # Transductive reference rows, reported apart: both refined by this many soft k-means
      # rounds over each episode's unlabelled queries (0: none).
      transductive_steps=1,
      # Diagnostics of each row's last checkpoint: reverse steps between trajectory points, and
      # the episodes and step ranges of the held-out noise error.
      trajectory_every=10, diagnostic_episodes=200, diagnostic_buckets=10))
  apply_variant(config, RECOMMENDED)
  return config


def cpu_schedule(config, pretrain_epochs: int, train_steps: int) -> None:
  """The schedule of the configs sized for a 2-core CPU (the embedded datasets, small images).

  `pretrain_epochs` of the Classifier-Baseline optimiser (x0.1 for the last one), validated on
  300 episodes; `train_steps` diffusion steps per shot setting instead of the paper's 300,000,
  so the EMA starts after 500 steps with decay 0.999 (the paper's 0.9999 would average over
  more steps than the run has), and validation on 200 episodes every 500 keeps the best.
  """
  config.pretrain.update(dict(epochs=pretrain_epochs, lr_decay_epochs=(pretrain_epochs - 1,),
                              val_episodes=300, log_every_steps=16))
  config.train.update(dict(steps=train_steps, steps_per_call=100, log_every_steps=100,
                           val_every_steps=500, checkpoint_every_steps=500, val_episodes=200,
                           ema_start_step=500, ema_decay=0.999))


def cpu_conv4(dataset: str, arg: str | None, pretrain_epochs: int,
              train_steps: int) -> ml_collections.ConfigDict:
  """The locked config of Conv4 on `dataset` sized for a 2-core CPU (`cpu_schedule`), with the
  presets of `arg` applied: the configs of the embedded datasets."""
  config = base_config(dataset, "conv4")
  cpu_schedule(config, pretrain_epochs=pretrain_epochs, train_steps=train_steps)
  return finalize(config, arg)


def _shot(config, value):
  shots = tuple(int(s) for s in str(value).replace("+", " ").split())
  config.train.shots = shots
  config.eval.shots = shots


def _variant(config, value):
  apply_variant(config, str(value))


def _tiny(config, value):
  if str(value).lower() in ("1", "true"):
    apply_tiny(config)
  elif str(value).lower() not in ("0", "false"):
    raise ConfigError(f"config preset tiny={value} must be tiny=1 (or 0)")


# Presets a config file accepts after the colon: name -> function(config, value).
PRESETS = {"shot": _shot, "tiny": _tiny, "variant": _variant}


def parse_arg(arg: str | None) -> dict[str, str]:
  """'shot=1,tiny=1' -> {'shot': '1', 'tiny': '1'}; '' or None -> {}."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ConfigError(f"config preset {item!r} must be name=value, e.g. shot=1; known "
                        f"presets: {', '.join(sorted(PRESETS))}")
    name, value = item.split("=", 1)
    out[name.strip()] = value.strip()
  return out


def finalize(config: ml_collections.ConfigDict, arg: str | None = None,
             presets: dict | None = None) -> ml_collections.ConfigDict:
  """Applies the presets named in `arg` and locks the config (`checks.check` checks it).

  Args:
    config: from `base_config`, edited by a config file.
    arg: the text after the colon in `--config=file.py:arg`, e.g. "shot=1,tiny=1".
    presets: the presets this config file accepts (default `PRESETS`).

  Raises:
    ConfigError: an unknown preset or a preset value that cannot work.
  """
  presets = PRESETS if presets is None else presets
  # tiny first, so that shot= and variant= given beside it still choose those fields.
  for name, value in sorted(parse_arg(arg).items(), key=lambda item: item[0] != "tiny"):
    if name not in presets:
      raise ConfigError(f"unknown config preset {name!r}; this config accepts: "
                        f"{', '.join(sorted(presets)) or 'none'}")
    presets[name](config, value)
  config.lock()
  return config


def check(config) -> None:
  """Checks what a locked config cannot and needs no model module to know: known stages,
  finite numbers, positive sizes and rates, allowed names, and values that other sections
  rule out. `metadiff_jax.checks.check` runs this and the checks of the modules that own the
  other values, before any stage (overrides included)."""
  unknown = [s for s in stages_of(config) if s not in STAGES + OPTIONAL_STAGES]
  if unknown:
    raise ConfigError(f"unknown stage {unknown[0]!r} in config.stages; choose from "
                      f"{', '.join(STAGES + OPTIONAL_STAGES)}")
  if not stages_of(config):
    raise ConfigError("config.stages is empty, so nothing would run; name some of "
                      f"{', '.join(STAGES + OPTIONAL_STAGES)}")
  for field, value in _numbers(config.to_dict()):
    if not math.isfinite(value):
      raise ConfigError(f"config.{field} is {value}; give a finite number")
  for section in ("pretrain", "train"):
    if not config[section].learning_rate > 0:
      raise ConfigError(f"config.{section}.learning_rate must be positive, got "
                        f"{config[section].learning_rate!r}")
  for section, field, low in (("pretrain", "epochs", 0), ("pretrain", "batch_size", 1),
                              ("train", "steps", 0), ("train", "episodes_per_step", 1),
                              ("train", "steps_per_call", 1), ("train", "ways", 2),
                              ("eval", "episodes", 1), ("eval", "batch_episodes", 1),
                              ("eval", "diagnostic_episodes", 0),
                              ("eval", "diagnostic_buckets", 1),
                              ("eval", "ways", 2), ("eval", "queries", 1),
                              ("diffusion", "num_steps", 1)):
    value = config[section][field]
    if int(value) != value or value < low:
      raise ConfigError(f"config.{section}.{field} must be an integer >= {low}, got {value!r}")
  for shots_field in ("train.shots", "eval.shots"):
    section, field = shots_field.split(".")
    shots = config[section][field]
    if shots is not None and (not shots or any(int(k) != k or k < 1 for k in shots)):
      raise ConfigError(f"config.{shots_field} must be a tuple of positive ints like (1, 5), "
                        f"got {shots!r}")
  for field, allowed in (("backbone.compute_dtype", DTYPES),
                         ("diffusion.sampler_dtype", DTYPES),
                         ("diffusion.sampler_precision", PRECISIONS)):
    section, name = field.split(".")
    if config[section][name] not in allowed:
      raise ConfigError(f"config.{field} must be one of {', '.join(allowed)}, got "
                        f"{config[section][name]!r}")
  _check_eval_checkpoint(config)
  if config.prototypes.augmented_passes < 0:
    raise ConfigError("config.prototypes.augmented_passes must be >= 0 (0: clean images)")
  _check_combinations(config)
  if not 0 <= config.train.ema_decay < 1:
    raise ConfigError(f"config.train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
  if "analysis" in stages_of(config):
    _check_analysis(config)
  if "stability" in stages_of(config):
    _check_stability(config)


def _numbers(values, prefix: str = ""):
  """(field, value) for every float in a nested dict of config values, tuples included."""
  for name, value in values.items():
    field = f"{prefix}{name}"
    if isinstance(value, dict):
      yield from _numbers(value, f"{field}.")
    elif isinstance(value, (tuple, list)):
      yield from ((f"{field}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))
    elif isinstance(value, float):
      yield field, value


def eval_checkpoint(config) -> str | int:
  """config.eval.checkpoint as "best", "last" or a step (an int; digits given as a string too).

  Raises:
    ConfigError: for anything else.
  """
  value = config.eval.get("checkpoint", "best")  # absent from configs of older workdirs
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  if value in ("best", "last") or (isinstance(value, int) and not isinstance(value, bool)
                                   and value >= 0):
    return value
  raise ConfigError(f"config.eval.checkpoint must be 'best', 'last' or a step >= 0 kept in "
                    f"train_<K>shot/checkpoints, got {value!r}")


def _check_eval_checkpoint(config) -> None:
  choice = eval_checkpoint(config)
  if choice != "best" and not config.denoiser.unet:
    raise ConfigError(f"config.eval.checkpoint = {choice!r} picks a trained denoiser, but "
                      "config.denoiser.unet = False has no parameters and no checkpoints; "
                      "leave config.eval.checkpoint at 'best'")


def _check_stability(config) -> None:
  """The stability section's values (checked only where the stability stage runs)."""
  s = config.stability
  for field in ("variants", "lr_variants", "length_variants"):
    unknown = [v for v in s[field] if v not in VARIANTS]
    if unknown or (field == "variants" and not s[field]):
      raise ConfigError(f"config.stability.{field} must name some of {', '.join(VARIANTS)}, "
                        f"got {tuple(s[field])!r}")
  for field, low in (("trajectory_every", 1), ("diagnostic_episodes", 0),
                     ("diagnostic_buckets", 1)):
    if int(s[field]) != s[field] or s[field] < low:
      raise ConfigError(f"config.stability.{field} must be an integer >= {low}, got "
                        f"{s[field]!r}")
  for field in ("episodes", "steps", "val_every_steps", "checkpoint_every_steps",
                "val_episodes"):
    if s[field] is not None and (int(s[field]) != s[field] or s[field] < 1):
      raise ConfigError(f"config.stability.{field} must be a positive integer or None, got "
                        f"{s[field]!r}")
  if any(not r > 0 for r in s.learning_rates):
    raise ConfigError(f"config.stability.learning_rates must be positive, got "
                      f"{tuple(s.learning_rates)!r}")
  if any(int(n) != n or n < 1 for n in s.lengths):
    raise ConfigError(f"config.stability.lengths must be positive step counts, got "
                      f"{tuple(s.lengths)!r}")
  if int(s.transductive_steps) != s.transductive_steps or s.transductive_steps < 0:
    raise ConfigError(f"config.stability.transductive_steps must be an integer >= 0, got "
                      f"{s.transductive_steps!r}")
  if int(s.shrinkage_draws) != s.shrinkage_draws or s.shrinkage_draws < 1 or \
      not s.shrinkage_l2 > 0:
    raise ConfigError("config.stability.shrinkage_draws must be a positive integer and "
                      f"shrinkage_l2 positive, got {s.shrinkage_draws!r}, {s.shrinkage_l2!r}")
  if s.shots is not None and (not s.shots or any(int(k) != k or k < 1 for k in s.shots)):
    raise ConfigError(f"config.stability.shots must be a tuple of positive ints like (1, 5), "
                      f"got {s.shots!r}")
  if config.denoiser.head != "prototype" or config.denoiser.gradient != "l2" or \
      not config.denoiser.unet:
    raise ConfigError("the stability study compares variants of the paper's prototype "
                      "denoiser: keep config.denoiser.head = 'prototype', gradient = 'l2', "
                      "unet = True")


def _check_analysis(config) -> None:
  """The analysis section's values (checked only where the analysis stage runs)."""
  a = config.analysis
  unknown = [p for p in a.parts if p not in ANALYSIS_PARTS]
  if unknown or not a.parts:
    raise ConfigError(f"config.analysis.parts must name some of {', '.join(ANALYSIS_PARTS)}, "
                      f"got {tuple(a.parts)!r}")
  if a.rows is not None:
    unknown = [r for r in a.rows if r not in ANALYSIS_ROWS]
    if unknown or not a.rows:
      raise ConfigError(f"config.analysis.rows must name some of {', '.join(ANALYSIS_ROWS)} "
                        f"(or be None for all), got {tuple(a.rows)!r}")
  for field, low in (("inner_steps", 1), ("meta_steps", 0), ("meta_episodes_per_step", 1),
                     ("queries", 1), ("steps_per_call", 1), ("val_episodes", 1),
                     ("batch_episodes", 1), ("trajectory_every", 1), ("log_every_steps", 1),
                     ("val_every_steps", 1)):
    value = a[field]
    if int(value) != value or value < low:
      raise ConfigError(f"config.analysis.{field} must be an integer >= {low}, got {value!r}")
  for field in ("episodes", "denoiser_steps"):
    value = a[field]
    if value is not None and (int(value) != value or value < 1):
      raise ConfigError(f"config.analysis.{field} must be a positive integer or None, got "
                        f"{value!r}")
  for field in ("gda_learning_rates", "gda_steps", "memory_inner_steps"):
    if not a[field] or any(v <= 0 for v in a[field]):
      raise ConfigError(f"config.analysis.{field} must be a non-empty tuple of positive "
                        f"numbers, got {a[field]!r}")
  if a.shots is not None and (not a.shots or any(int(k) != k or k < 1 for k in a.shots)):
    raise ConfigError(f"config.analysis.shots must be a tuple of positive ints like (1, 5), "
                      f"got {a.shots!r}")
  if not 0 <= a.gda_momentum < 1:
    raise ConfigError(f"config.analysis.gda_momentum must be in [0, 1), got {a.gda_momentum}")
  if a.meta_learning_rate <= 0 or a.init_std < 0:
    raise ConfigError("config.analysis.meta_learning_rate must be > 0 and init_std >= 0")


def _check_combinations(config) -> None:
  """Values of one section that another section's rule out, and the linear head's fit."""
  d, p = config.denoiser, config.prototypes
  if config.diffusion.feature_rms is not None and p.augmented_passes:
    raise ConfigError("config.diffusion.feature_rms rescales the cached clean features, so "
                      "the targets are their class means: set "
                      "config.prototypes.augmented_passes = 0")
  if not d.unet and "train" in stages_of(config):
    raise ConfigError("config.denoiser.unet = False has no parameters, so there is nothing to "
                      "train; drop 'train' from config.stages, e.g. "
                      "('pretrain', 'prototypes', 'eval')")
  steps = p.linear_fit_steps
  if int(steps) != steps or steps < 1:
    raise ConfigError(f"config.prototypes.linear_fit_steps must be an integer >= 1, got "
                      f"{steps!r}")
  if not p.linear_fit_l2 >= 0:
    raise ConfigError(f"config.prototypes.linear_fit_l2 must be >= 0, got {p.linear_fit_l2!r}")


def load_config_file(path: str, arg: str | None = None, what: str = "pipeline config"):
  """`get_config(arg)` of the config file at `path`; a ConfigError if it is missing."""
  if not os.path.exists(path):
    raise ConfigError(f"no {what} {path} for this dataset and backbone; choose a backbone that "
                      "configs/ has a file for")
  return read_config_file(path, arg, pass_arg=True)


def read_config_file(path: str, arg: str | None = None, pass_arg: bool = False):
  """`get_config()` of the Python file at `path` (`get_config(arg)` where `arg` is given or
  `pass_arg`), as `--config=PATH[:ARG]` reads it; a ConfigError in one line if the file is
  missing, does not import, defines no get_config, or get_config fails or returns no config.
  """
  if not path:
    raise ConfigError("no config file given; pass one, e.g. --config=configs/glyphs_conv4.py")
  if not os.path.isfile(path):
    raise ConfigError(_missing_config_message(path))
  # As ml_collections loads it: Python source whatever the suffix, registered in sys.modules
  # (dataclasses and pickle look a class's module up there).
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  loader = importlib.machinery.SourceFileLoader(name, path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
  sys.modules[name] = module
  try:
    loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path} does not import: {type(e).__name__}: {e.msg} (line "
                      f"{e.lineno}); fix the file") from None
  except Exception as e:  # noqa: BLE001  (whatever the file's own code raises)
    raise ConfigError(f"config file {path} does not import: {_where(e, path)}; fix the file "
                      "(or the package it imports)") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"config file {path} defines no get_config(); a config file defines "
                      "get_config(arg=None) that returns an ml_collections.ConfigDict (e.g. "
                      "configs/glyphs_conv4.py)")
  args = (arg,) if arg is not None or pass_arg else ()
  try:
    inspect.signature(get_config).bind(*args)
  except TypeError:
    raise ConfigError(
        f"get_config() of {path} takes no argument, so it has no presets; drop ':{arg}' from "
        "--config" if args else f"get_config() of {path} needs an argument; give it after a "
        f"colon: --config={path}:ARG") from None
  except ValueError:  # no signature to inspect (a builtin): the call tells
    pass
  try:
    config = get_config(*args)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001  (whatever the file's own code raises)
    raise ConfigError(f"get_config({', '.join(map(repr, args))}) of {path} failed: "
                      f"{_where(e, path)}; fix the file or its presets") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() of {path} returned {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; return the config (a missing return?)")
  return config


def _missing_config_message(path: str) -> str:
  """Says a config file does not exist, from where, and the nearest name that does."""
  where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
  if os.path.isdir(path):
    return f"config file {path} is a directory; give a .py file in it, e.g. {path}/<name>.py"
  folder = os.path.dirname(path) or "."
  try:
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and n != "__init__.py")
  except OSError:
    names = []
  close = difflib.get_close_matches(os.path.basename(path), names, n=1)
  hint = (f"did you mean {os.path.join(os.path.dirname(path), close[0])}?" if close else
          f"{folder} holds {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}" if names
          else "give the path of a config file, e.g. configs/glyphs_conv4.py from the "
               "repository's root")
  return f"config file {path} does not exist{where}; {hint}"


def _where(error: BaseException, path: str) -> str:
  """`Type: message (line N)`, N the deepest line of the file at `path` in the traceback."""
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  text = f"{type(error).__name__}: {error}"
  return text + (f" (line {lines[-1]})" if lines else "")


def check_override(config, field: str, source: str) -> None:
  """Raises a ConfigError naming `field` (`train.steps`) and the nearest existing field where
  the config has no such field; `source` (the config file) is named in the message."""
  parts = field.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return  # an element of a tuple or a value: ml_collections' parser checks the rest
    if part not in node:
      names = list(node.keys())
      close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
      if close:
        guess = parts[:i] + close
        if _has_field(config, guess + parts[i + 1:]):
          guess += parts[i + 1:]  # a misspelt section: name the whole field
        hint = f"did you mean {'.'.join(guess)}?"
      else:
        hint = f"{'.'.join(parts[:i]) or 'the config'} has {', '.join(sorted(names))}"
      raise ConfigError(f"unknown config field {field} in {source}; {hint}")
    node = node[part]


def check_override_type(field: str, value, before) -> None:
  """Raises a ConfigError where an override gives a tuple field elements of another type than
  the config file's (`--config.train.shots=abc` for a tuple of ints); ml_collections checks
  the type of other values, not a tuple's elements. `before` is the file's value."""
  if not (isinstance(before, tuple) and before and isinstance(value, tuple)):
    return
  kinds = {type(v) for v in before}
  if len(kinds) != 1:
    return  # a tuple of mixed types: nothing to go by
  kind = kinds.pop()
  accepted = (int, float) if kind is float else (kind,)
  if any(not isinstance(v, accepted) or (isinstance(v, bool) and kind is not bool)
         for v in value):
    raise ConfigError(f"--config.{field} gives {value!r}, but config.{field} holds "
                      f"{kind.__name__} values, like {before!r}")


def _has_field(config, parts) -> bool:
  node = config
  for part in parts:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def dataset_pipeline_config(arg: str | None, datasets: dict, config_dir: str,
                            own: dict | None = None):
  """The pipeline config of the dataset that `arg`'s presets name, for configs that build on
  one (configs/paper_analysis.py, configs/stability.py).

  Args:
    arg: the presets after the colon: dataset=NAME (default glyphs), backbone=NAME, the
      caller's `own` presets, and the rest (shot=...) for the dataset's config, which checks
      them.
    datasets: dataset preset -> (its config file's dataset part, default backbone).
    config_dir: where configs/<dataset>_<backbone>.py live.
    own: the caller's presets and their defaults, taken out of `arg`.

  Returns:
    (config, dataset preset, {own preset: value}).
  """
  presets = parse_arg(arg)
  dataset = presets.pop("dataset", "glyphs")
  if dataset not in datasets:
    raise ConfigError(f"unknown dataset preset {dataset!r}; choose from "
                      f"{', '.join(datasets)}")
  prefix, backbone = datasets[dataset]
  backbone = presets.pop("backbone", backbone)
  mine = {name: presets.pop(name, default) for name, default in (own or {}).items()}
  config = load_config_file(os.path.join(config_dir, f"{prefix}_{backbone}.py"),
                            ",".join(f"{k}={v}" for k, v in presets.items()))
  return config, dataset, mine


WORKDIR_CONFIG = "config.json"


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """The locked config of a dict written by `config.to_dict()` (a workdir's config.json).

  JSON stores tuples as lists; they become tuples again, as the config files write them (the
  modules built from a config are static arguments of `jax.jit` and must be hashable). A None
  that `base_config` declares as a typed placeholder becomes that placeholder again, so that a
  command-line override (`--config.diffusion.num_sampling_steps=100`) can still set it.
  """
  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value

  def typed_nones(config, template):
    for name in list(config.keys()):
      if name not in template:
        continue
      value = config[name]
      if isinstance(value, ml_collections.ConfigDict):
        if isinstance(template[name], ml_collections.ConfigDict):
          typed_nones(value, template[name])
      elif value is None:
        field_type = template.get_ref(name).get_type()
        if field_type not in (None, type(None)):
          config[name] = config_dict.placeholder(field_type)

  config = ml_collections.ConfigDict(tuples(values))
  typed_nones(config, base_config())
  config.lock()
  return config


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was last invoked with (WORKDIR/config.json), locked.

  Raises:
    ConfigError: if the workdir has none (no run was started there) or it cannot be read.
  """
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), WORKDIR_CONFIG)
  if not os.path.exists(path):
    raise ConfigError(f"no {WORKDIR_CONFIG} in {os.path.dirname(path)}: it is not the workdir "
                      "of a run; give the --workdir of a trained run (python -m "
                      "metadiff_jax.main) or of an import (python -m metadiff_jax.import_torch)")
  try:
    with open(path) as f:
      values = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read {path} ({e}); rerun the pipeline in that workdir to "
                      "rewrite it") from None
  if not isinstance(values, dict):
    raise ConfigError(f"{path} does not hold a config; rerun the pipeline in that workdir")
  return from_dict(values)


def stages_of(config) -> tuple[str, ...]:
  """config.stages as a tuple of stage names."""
  return tuple(config.stages)


def eval_shots(config) -> tuple[int, ...]:
  """The shot settings to evaluate: eval.shots, or train.shots when unset."""
  return tuple(int(k) for k in (config.eval.shots or config.train.shots))
