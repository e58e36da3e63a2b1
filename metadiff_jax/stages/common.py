"""What the stages share: the workdir's layout, the dataset, the backbone, the feature cache.

A workdir holds one run:

    WORKDIR/config.json            the config that made the outputs (docs/WORKDIR.md)
    WORKDIR/pretrain/              backbone pretraining: checkpoints/, best/, metrics, curves.png
    WORKDIR/features/              the feature cache (one .npz per split and backbone)
    WORKDIR/prototypes/            targets.npz: the diffusion targets w0 of the base classes
    WORKDIR/train_<K>shot/         diffusion training for K shots: checkpoints/, best/, ...
    WORKDIR/eval/                  per-shot results, curves
    WORKDIR/results.json, results.md   the accuracy table of the eval stage

Every stage reads what earlier stages wrote from here and raises a `StageError` naming the
stage to run when it is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import backbones, checkpoint, mesh, prototypes, torch_import
from metadiff_jax.data import augment, features
from metadiff_jax.errors import StageError, TrainingError, UserError
from metadiff_jax.workdir import json_default

# Tags folded into the run's key, one per purpose, so that no two streams coincide.
KEY_TAGS = {"pretrain_init": 1, "pretrain_data": 2, "pretrain_dropout": 3, "prototypes": 4,
            "denoiser_init": 5, "diffusion": 6, "sampling": 7, "episodes": 8, "analysis": 9,
            "predict": 10}


def key(config, purpose: str, *fold: int) -> jax.Array:
  """The typed key of `purpose` under config.seed, with further integers folded in."""
  k = jax.random.fold_in(jax.random.key(config.seed), KEY_TAGS[purpose])
  for value in fold:
    k = jax.random.fold_in(k, value)
  return k


is_writer = mesh.is_writer


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(os.path.expanduser(workdir), name)


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir and checks that it can be written; returns its absolute path."""
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise StageError(f"cannot write to workdir {path} ({e.strerror or e}); choose a writable "
                     "--workdir") from None
  return path


def write_json(path: str, obj) -> None:
  """Writes JSON atomically (a killed run leaves the previous file, not half of a new one)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=json_default)
  os.replace(tmp, path)


def cached_result(path: str, settings: dict, compute, what: str) -> dict:
  """The result JSON at `path` if it was written with these `settings`, else
  {"settings": settings, **compute()}, written there (by the writer process).

  `settings` are compared as JSON would store them (tuples as lists), so a result written
  by an earlier run is found again. `what` names it in the log line of a reuse.
  """
  settings = json.loads(json.dumps(settings, default=json_default))
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous.get("settings") == settings:
      logging.info("%s: result already in %s; skipping", what, path)
      return previous
  result = {"settings": settings, **compute()}
  if is_writer():
    write_json(path, result)
  return result


# ----------------------------------------------------------------------------- the dataset

def dataset_ref(config):
  from metadiff_jax.data import load  # imports tensorflow-datasets: only where data is read
  return load.DatasetRef(config.data.name, config.data.data_dir, config.data.builder_config)


@functools.lru_cache(maxsize=8)
def _load_split(ref, split: str):
  from metadiff_jax.data import load
  return load.load_split(ref, split)


def load_split(config, split: str):
  """The whole split in memory (`load.SplitArrays`), read once per process."""
  return _load_split(dataset_ref(config), split)


def num_classes(config, split: str) -> int:
  from metadiff_jax.data import load
  return len(load.class_names(dataset_ref(config), split))


def augment_config(config) -> augment.AugmentConfig:
  return augment.from_config(config.data)


# ----------------------------------------------------------------------------- the backbone

def backbone(config):
  """The configured backbone module."""
  kwargs = {"dtype": jnp.bfloat16 if config.backbone.compute_dtype == "bfloat16" else None}
  if config.backbone.name.startswith("resnet12"):
    kwargs["activate_last"] = config.backbone.activate_last
    if config.backbone.dropblock_rate is not None:
      kwargs["dropblock_rate"] = config.backbone.dropblock_rate
  try:
    return backbones.make(config.backbone.name, **kwargs)
  except ValueError as e:
    raise UserError(f"config.backbone.name: {e}") from None


@functools.lru_cache(maxsize=16)
def embed_fn(module, aug: augment.AugmentConfig):
  """uint8 images -> features of the backbone in eval mode, with the dataset's normalisation.

  Jitted, and one function per (backbone, preprocessing), so that embedding the validation
  split after every pretraining epoch compiles once.
  """

  @jax.jit
  def apply(variables, images):
    features = module.apply(variables, augment.preprocess(images, aug), train=False)
    return features.astype(jnp.float32)

  return apply


def preprocessing_tag(config) -> str:
  """What the embedding does besides the variables (it keys the feature cache)."""
  aug = augment_config(config)
  tag = f"{config.backbone.name}|mean={aug.mean}|std={aug.std}"
  if config.backbone.compute_dtype != "float32":
    tag += f"|{config.backbone.compute_dtype}"
  return tag


def pretrained_backbone(config, workdir: str):
  """(module, variables) of the pretrained backbone that the pretrain stage kept.

  Raises:
    StageError: if there is none (run the pretrain stage).
  """
  from metadiff_jax.stages import pretrain  # the template of its state
  directory = os.path.join(stage_dir(workdir, "pretrain"), "best")
  store = checkpoint.Checkpoints(directory, max_to_keep=1)
  try:
    if store.latest_step() is None:
      raise StageError(f"no pretrained backbone in {directory}; run the pretrain stage first "
                       "(--config.stages=\"('pretrain',)\"), or set config.backbone.checkpoint")
    state, _ = store.restore(pretrain.initial_state(config))
  except checkpoint.CheckpointMismatchError as e:
    raise StageError(f"the pretrained backbone in {directory} does not fit the configured "
                     f"backbone: {e.detail}; use the config it was trained with, or a new "
                     "workdir") from None
  except checkpoint.UnreadableCheckpointError as e:
    raise StageError(f"the pretrained backbone in {directory} cannot be read: {e.detail}; "
                     f"move {stage_dir(workdir, 'pretrain')} aside and rerun the pretrain stage"
                     " (nothing is deleted)") from None
  finally:
    store.close()
  return backbone(config), pretrain.backbone_variables(state)


def split_features(config, workdir: str, split: str, module=None, variables=None,
                   progress: bool = True) -> features.FeatureSet:
  """The cached features of `split` under the pretrained (or the given) backbone."""
  if variables is None:
    module, variables = pretrained_backbone(config, workdir)
  data = load_split(config, split)
  return features.split_features(
      workdir, data, split, embed_fn(module, augment_config(config)), variables,
      preprocessing=preprocessing_tag(config), batch_size=config.pretrain.embed_batch_size,
      progress=progress, write=is_writer())


def diffusion_features(config, feature_set: features.FeatureSet) -> features.FeatureSet:
  """The features the diffusion stages see: the cached ones, or, where
  config.diffusion.feature_rms = r is set, each row rescaled to norm r sqrt(D) (its
  root-mean-square coordinate r). The key says which, so nothing cached mixes them up."""
  rms = config.diffusion.feature_rms
  if rms is None:
    return feature_set
  return dataclasses.replace(feature_set, features=rescale_features(feature_set.features, rms),
                             key=f"{feature_set.key}/rms{float(rms):g}")


def rescale_features(x, rms) -> np.ndarray:
  """[n, D] features with each row rescaled to norm rms sqrt(D) (float32); rms None: as is."""
  if rms is None:
    return np.asarray(x, np.float32)
  x = np.asarray(x, np.float64)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return (x * (float(rms) * np.sqrt(x.shape[1]) / np.maximum(norms, 1e-12))).astype(np.float32)


def import_backbone(config, template_variables):
  """The backbone variables of config.backbone.checkpoint, checked against the template."""
  path = os.path.expanduser(config.backbone.checkpoint)
  if not os.path.exists(path):
    raise UserError(f"config.backbone.checkpoint {path} does not exist; give the path of a "
                    "PyTorch ResNet12 state dict (.pth or .npz)")
  try:
    return torch_import.load_backbone_file(path, template_variables)
  except (KeyError, ValueError) as e:
    msg = e.args[0] if e.args else str(e)
    raise UserError(f"cannot import the backbone {path}: {msg}") from None


# ----------------------------------------------------------------------------- episodes

def sharded_episodes(sampler, start: int, batch: int):
  """Episodes start..start + batch - 1 of an `episodes.EpisodeSampler`, split over the mesh.

  Each process draws only the episodes its devices hold (`mesh.shard_rows`).

  Returns:
    (support [B, N*K], support_labels, query [B, N*Q], query_labels, index [B] int32), index
    arrays as in `episodes.Episodes`, B = `batch` (a multiple of the device count).
  """
  def rows(a, b):
    eps = sampler.batch(start + a, b - a)
    return (eps.support, eps.support_labels, eps.query, eps.query_labels,
            eps.index.astype(np.int32))
  return mesh.shard_rows(batch, rows)


def restore_latest(store: checkpoint.Checkpoints, state, meta: dict, run_dir: str, what: str):
  """(state, meta) of the newest intact checkpoint in `store`, or the given ones if it has
  none. Unreadable newer steps are skipped with a log line (`checkpoint.Checkpoints.restore`).

  Raises:
    TrainingError: if the checkpoint does not fit `state` (a run of another config), or no
      step in `store` can be read.
  """
  if store.latest_step() is None:
    return state, meta
  try:
    state, meta = store.restore(state)
  except checkpoint.CheckpointMismatchError as e:
    raise TrainingError(f"the checkpoint {e.directory}/{e.step} does not fit the config: "
                        f"{e.detail}; use the config it was written with, or move {run_dir} "
                        "aside to retrain this stage") from None
  except checkpoint.UnreadableCheckpointError as e:
    raise TrainingError(f"no intact checkpoint in {e.directory}: {e.detail}; move {run_dir} "
                        "aside to retrain this stage (nothing is deleted)") from None
  logging.info("%s: resumed from step %d", what, int(state.step))
  return state, meta


@functools.partial(jax.jit, static_argnames=("ways",))
def prototype_accuracy(features_dev, support_idx, support_labels, query_idx, query_labels,
                       ways: int):
  """[B] query accuracy of class-mean prototypes under 10 x cosine (the pretrain check)."""
  support, query = features.gather(features_dev, support_idx, query_idx)
  protos = jax.vmap(prototypes.class_means, (0, 0, None))(support, support_labels, ways)
  logits = prototypes.cosine_logits(query, protos, scale=10.0)
  return jnp.mean(jnp.argmax(logits, -1) == query_labels, axis=-1)


def log_config(config) -> None:
  logging.info("config:\n%s", config)
