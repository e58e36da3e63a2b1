"""PyTorch checkpoints into a workdir, as its own: `python -m metadiff_jax.import_torch`.

    python -m metadiff_jax.import_torch --checkpoint best_model_5shot.pth \\
        --backbone_arch metadiff --shots 5 --workdir runs/imported
    python -m metadiff_jax.main --config=configs/from_workdir.py:runs/imported \\
        --workdir=runs/imported --config.stages="('eval',)"
    python -m metadiff_jax.predict --workdir runs/imported --support S/ --query Q/

What it writes is what the stages would have written, so `eval` and `predict` run on it as on a
trained workdir:

    WORKDIR/config.json            --config's config (default configs/miniimagenet_resnet12.py)
                                   with the checkpoint's backbone (name from its widths,
                                   activate_last from --backbone_arch, its input normalisation
                                   where known), the original's denoiser (variant "faithful",
                                   the head's sizes), train/eval shots (K,) and the stages
                                   that keep the imported weights: ('eval',) with a head,
                                   ('prototypes', 'train', 'eval') with a backbone alone
    WORKDIR/pretrain/best/         the backbone, as a `PretrainState` (its linear classifier over
                                   the base classes stays at its initialisation; nothing reads it)
    WORKDIR/train_<K>shot/best/    the K-shot head as a `DiffusionState`, its params and its EMA
                                   params both the imported weights

The sources (docs/IMPORTING.md lists the layouts and what was verified how):

- `--checkpoint FILE`: the original MetaDiff's one file, {'embedding': backbone under
  DataParallel's `module.`, 'head': the diffusion wrapper with `model.*`, an EMA copy
  `ema_model.*` and the schedule buffers}; `.pth` (needs PyTorch) or a flattened `.npz`
  (`embedding.module.layer1.conv1.weight`, `head.model.proto_inf1.weight`, ...).
- `--backbone FILE` and/or `--head FILE`: the parts in separate files. A backbone alone writes
  the backbone and the config (then run the prototypes, train and eval stages); a head alone
  needs a workdir that already holds a backbone of the head's feature width.

`--use_ema` takes the head's `ema_model.*` copy; the default is `model.*`, because the original's
published training script never updates the EMA copy, which stays the initial random network.

Nothing is ever overwritten: a workdir that already holds a backbone or a K-shot head with other
weights is refused (the same weights are accepted, so importing the 1-shot and then the 5-shot
checkpoint of one backbone into one workdir works). Every problem is one line (`UserError`);
the command prints it as "error: ..." and exits with status 2, having written nothing.

From Python (notebooks):

    from metadiff_jax import import_torch
    summary = import_torch.import_checkpoint("runs/imported", checkpoint="best.pth",
                                             arch="metadiff", shots=5)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import shlex
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import (backbones, config_lib, embedding, errors, mesh, method, pretraining,
                          pytorch_weights, schedule, train_state)
from metadiff_jax import checkpoint as checkpoint_lib
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import augment
from metadiff_jax.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "miniimagenet_resnet12.py")
# ResNet12 widths -> config.backbone.name.
WIDTHS = {(64, 128, 256, 512): "resnet12", (64, 160, 320, 640): "resnet12_wide"}

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_METAOPTNET_CIFAR = (tuple(x / 255 for x in (129.37731888, 124.10583864, 112.47758569)),
                     tuple(x / 255 for x in (68.20947949, 65.43124043, 70.45866994)))


class ImportCheckpointError(UserError):
  """A checkpoint, flag or workdir that the import cannot use, with a one-line fix."""


@dataclasses.dataclass(frozen=True)
class Arch:
  """A published ResNet12 whose checkpoints can be imported (docs/IMPORTING.md).

  Attributes:
    name: the --backbone_arch value.
    activate_last: LeakyReLU after the fourth block's sum (`config.backbone.activate_last`).
    block_index: its state dicts name each layer's parameters `layerL.0.*` (an nn.Sequential
      holding one block) rather than `layerL.*`.
    source: the repository and file that define the network.
    normalization: dataset name -> (mean, std) of pixels in [0, 1] it was trained with, as
      read in its source; the config keeps the dataset's own for the others.
    note: what else its network does that `backbones.ResNet12` does not (or None).
  """

  name: str
  activate_last: bool
  block_index: bool
  source: str
  normalization: dict = dataclasses.field(default_factory=dict)
  note: Optional[str] = None


ARCHS = {
    "metadiff": Arch(
        "metadiff", activate_last=False, block_index=False,
        source="zhangbq-research/MetaDiff models/resnet12_2.py",
        normalization={"mini_imagenet": augment.NORMALIZATION["mini_imagenet"]}),
    "meta_baseline": Arch(
        "meta_baseline", activate_last=True, block_index=False,
        source="yinboc/few-shot-meta-baseline models/resnet12.py",
        normalization={"mini_imagenet": _IMAGENET, "tiered_imagenet": _IMAGENET},
        note="Meta-Baseline resizes its 84x84 images to 80x80 (Resize(80)) before the "
             "backbone; the pipeline feeds the dataset's 84x84 images"),
    "metaoptnet": Arch(
        "metaoptnet", activate_last=True, block_index=True,
        source="kjunelee/MetaOptNet models/ResNet12_embedding.py",
        normalization={"mini_imagenet": augment.NORMALIZATION["mini_imagenet"],
                       "cifar_fs": _METAOPTNET_CIFAR, "fc100": _METAOPTNET_CIFAR},
        note="MetaOptNet's embedding is the flattened last map (avg_pool=False: 5x5x640 = "
             "16000-d at 84x84); the pipeline averages it over space (640-d)"),
    "feat": Arch(
        "feat", activate_last=True, block_index=True,
        source="Sha-Lab/FEAT model/networks/res12.py",
        normalization={"mini_imagenet": augment.NORMALIZATION["mini_imagenet"]},
        note="FEAT tests on Resize(92) + CenterCrop(84) of the original images; the pipeline "
             "feeds the dataset's 84x84 images"),
}


def import_checkpoint(workdir, checkpoint: Optional[str] = None, head: Optional[str] = None,
                      backbone: Optional[str] = None, arch: Optional[str] = None,
                      config=None, shots: Optional[int] = None, use_ema: bool = False,
                      trusted: bool = False, image_shape: Optional[Sequence[int]] = None,
                      base_classes: Optional[int] = None) -> dict:
  """Writes PyTorch checkpoints into `workdir` as the pipeline's checkpoints and config.

  Args:
    workdir: the workdir to write (created if missing).
    checkpoint: the original MetaDiff's one file with the backbone and the head ({'embedding':
      ..., 'head': ...}, `.pth` or flattened `.npz`); excludes `head` and `backbone`.
    head: a file with the head alone (its state dict, or a file of the original's layout).
    backbone: a file with the backbone alone (any layout of docs/IMPORTING.md).
    arch: the backbone's network, a key of `ARCHS`; needed wherever a backbone is imported.
    config: the pipeline config to start from: a ConfigDict, or a config file path with
      optional presets ("configs/x.py:shot=1"). Default: the workdir's config.json for a head
      alone into a workdir that has one, else configs/miniimagenet_resnet12.py.
    shots: K, the shot setting the head was trained for (the original trains one per K);
      needed wherever a head is imported.
    use_ema: take the head's `ema_model.*` copy instead of `model.*`.
    trusted: let `torch.load` unpickle Python objects besides tensors (trusted files only).
    image_shape: (H, W, C) of the backbone's input, with `base_classes`, where the dataset is
      neither built nor a standard benchmark (mini_imagenet, tiered_imagenet, cifar_fs, fc100).
    base_classes: the number of base classes (it sizes the pretraining classifier).

  Returns:
    A summary: {"workdir", "written", "reused", "config", "backbone", "head", "shots",
    "image_shape", "normalization", "notes", "commands": {"eval", "predict"}}.

  Raises:
    ImportCheckpointError: one line saying what to fix; nothing was written.
  """
  workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  checkpoint, head, backbone = (None if p is None else os.path.abspath(os.path.expanduser(
      os.fspath(p))) for p in (checkpoint, head, backbone))
  if checkpoint and (head or backbone):
    raise ImportCheckpointError("give either --checkpoint (the original's one file with "
                                "backbone and head) or --head/--backbone, not both")
  if not (checkpoint or head or backbone):
    raise ImportCheckpointError("nothing to import: give --checkpoint FILE (the original's "
                                "{'embedding', 'head'} file), or --backbone FILE and/or --head "
                                "FILE")
  head_path = checkpoint or head
  backbone_path = checkpoint or backbone
  if arch is not None and arch not in ARCHS:
    raise ImportCheckpointError(f"unknown --backbone_arch {arch!r}; choose from "
                                f"{', '.join(ARCHS)} (docs/IMPORTING.md)")
  if backbone_path and arch is None:
    raise ImportCheckpointError(f"--backbone_arch is required to import a backbone: one of "
                                f"{', '.join(ARCHS)}; the variants differ in details that "
                                "change every feature (docs/IMPORTING.md)")
  if head_path:
    if shots is None:
      raise ImportCheckpointError("--shots K is required to import a head: the original "
                                  "trains one head per shot setting; give the K it was "
                                  "trained for")
    if int(shots) != shots or shots < 1:
      raise ImportCheckpointError(f"--shots must be a positive integer, got {shots!r}")
    shots = int(shots)
  elif use_ema:
    raise ImportCheckpointError("--use_ema chooses the head's EMA copy, but no head is "
                                "imported; drop it or give --head/--checkpoint")
  for path in filter(None, (checkpoint, head, backbone)):
    if not os.path.exists(path):
      raise ImportCheckpointError(f"no file {path}; check the path")
    if os.path.isdir(path):
      raise ImportCheckpointError(f"{path} is a directory; give the checkpoint file")

  existing = _existing(workdir)
  config, config_source = _start_config(config, workdir, head_only=not backbone_path,
                                        has_config=existing["config"] is not None)
  summary: dict[str, Any] = {"workdir": workdir, "config": config_source, "written": [],
                             "reused": [], "notes": [], "backbone": None, "head": None}
  contents = {path: _read(path, trusted) for path in {p for p in (head_path, backbone_path) if p}}

  # ---------------------------------------------------------------- the backbone
  if backbone_path:
    chosen = ARCHS[arch]
    variables, widths = _backbone_variables(contents[backbone_path], backbone_path, chosen)
    config.backbone.name = WIDTHS[widths]
    config.backbone.activate_last = chosen.activate_last
    config.backbone.checkpoint = None
    summary["normalization"] = _set_normalization(config, chosen)
    if chosen.note:
      summary["notes"].append(chosen.note)
    shape, num_base, num_images, shape_source = _data_shape(config, image_shape, base_classes)
    module = embedding.backbone(config)
    try:
      pytorch_weights.check_backbone_fits(
          module, shape, variables, f"the backbone in {backbone_path}",
          f"its input must be the dataset's {'x'.join(map(str, shape))} images")
    except ValueError as e:
      raise ImportCheckpointError(str(e)) from None
    if existing["backbone"] is not None:
      if not _same_arrays(existing["backbone"][0], variables):
        raise ImportCheckpointError(
            f"{workdir} already holds another backbone (pretrain/best); choose an empty "
            "--workdir (nothing there was changed)")
      summary["reused"].append(workdir_lib.backbone_dir(workdir))
    summary["backbone"] = {"from": backbone_path, "arch": arch, "name": config.backbone.name,
                           "widths": list(widths), "activate_last": chosen.activate_last,
                           "source": chosen.source}
  else:  # a head alone: the workdir's backbone
    if existing["backbone"] is None:
      raise ImportCheckpointError(
          f"a head needs its backbone, and {workdir} holds none (pretrain/best): import both "
          "(--checkpoint FILE, or --head FILE --backbone FILE --backbone_arch ARCH), or "
          "import into the workdir that holds the backbone")
    variables, meta = existing["backbone"]
    shape = meta.get("image_shape") or _data_shape(config, image_shape, base_classes)[0]
    module = embedding.backbone(config)
    try:
      pytorch_weights.check_backbone_fits(
          module, shape, variables, f"the backbone in {workdir}/pretrain/best",
          "the config does not describe it; import with the --config it was written with")
    except ValueError as e:
      raise ImportCheckpointError(str(e)) from None
    summary["normalization"] = {"mean": _tuple(augment.from_config(config.data).mean),
                                "std": _tuple(augment.from_config(config.data).std),
                                "set": False}
  shape = tuple(int(d) for d in shape)
  feature_dim = backbones.feature_dim(module, shape)
  summary["image_shape"] = list(shape)
  summary["feature_dim"] = feature_dim

  # ---------------------------------------------------------------- the head
  trained = sorted(existing["heads"])
  if head_path:
    params = _head_params(contents[head_path], head_path, use_ema, config)
    sizes = pytorch_weights.tcunet_config_from_params(params)
    config_lib.apply_variant(config, "faithful")
    config.denoiser.head = "prototype"
    config.denoiser.gradient = "l2"
    config.denoiser.unet = True
    config.denoiser.feature_dim = None
    config.denoiser.hidden_dims = tuple(sizes["hidden_dims"])
    config.denoiser.time_embed_dim = sizes["time_embed_dim"]
    all_shots = tuple(sorted({shots, *trained}))
    config.train.shots = all_shots
    config.eval.shots = all_shots
    _check_head_fits(_head_template(config, feature_dim, shots), params, head_path,
                     feature_dim, backbone_path or f"{workdir}/pretrain/best")
    if shots in trained:
      if not _same_arrays(existing["heads"][shots], params):
        raise ImportCheckpointError(
            f"{workdir} already holds another {shots}-shot head (train_{shots}shot/best); "
            "choose an empty --workdir (nothing there was changed)")
      summary["reused"].append(os.path.join(workdir_lib.train_dir(workdir, shots), "best"))
    summary["head"] = {"from": head_path, "shots": shots, "use_ema": bool(use_ema),
                       "feature_dim": sizes["feature_dim"],
                       "hidden_dims": list(sizes["hidden_dims"]),
                       "time_embed_dim": sizes["time_embed_dim"]}
  _check_kept(existing, config, workdir)
  summary["shots"] = list(config.train.shots) if head_path else sorted(trained)
  # The stages that keep what was imported: the pretrain stage would train another backbone
  # and the train stage would retrain an imported head.
  config.stages = ("eval",) if summary["shots"] else ("prototypes", "train", "eval")
  summary["stages"] = list(config.stages)

  # ---------------------------------------------------------------- writing (all checks passed)
  workdir_lib.prepare_workdir(workdir)
  if backbone_path and existing["backbone"] is None:
    state = pretraining.initial_state(config, shape, num_images, num_base)
    state = mesh.replicate(pretraining.with_backbone(state, variables))
    directory = workdir_lib.backbone_dir(workdir)
    with checkpoint_lib.Checkpoints(directory, max_to_keep=1) as store:
      store.save(1, state, {"imported_from": backbone_path, "done": True,
                            "image_shape": list(shape), "arch": arch,
                            "image_shape_from": shape_source})
    summary["written"].append(directory)
  if head_path and shots not in trained:
    state = mesh.replicate(_head_state(config, feature_dim, params))
    directory = os.path.join(workdir_lib.train_dir(workdir, shots), "best")
    with checkpoint_lib.Checkpoints(directory, max_to_keep=1) as store:
      store.save(1, state, {"imported_from": head_path, "use_ema": bool(use_ema)})
    summary["written"].append(directory)
  path = os.path.join(workdir, config_lib.WORKDIR_CONFIG)
  workdir_lib.write_json(path, config.to_dict())
  summary["written"].append(path)
  summary["commands"] = commands(workdir)
  return summary


def commands(workdir: str) -> dict:
  """The eval and predict command lines for a workdir."""
  quoted = shlex.quote(workdir)
  return {
      "eval": (f"python -m metadiff_jax.main --config=configs/from_workdir.py:{quoted} "
               f"--workdir={quoted} --config.stages=\"('eval',)\""),
      "predict": (f"python -m metadiff_jax.predict --workdir {quoted} "
                  "--support SUPPORT_DIR --query QUERY_DIR"),
  }


# ----------------------------------------------------------------------------- reading

def _read(path: str, trusted: bool):
  """A checkpoint file's contents, or a one-line error."""
  try:
    return pytorch_weights.read_checkpoint(path, trusted=trusted)
  except FileNotFoundError:
    raise ImportCheckpointError(f"no file {path}; check the path") from None
  except ImportError as e:
    raise ImportCheckpointError(str(e)) from None
  except ValueError as e:
    raise ImportCheckpointError(str(e)) from None


def _backbone_variables(contents, path: str, arch: Arch):
  """(variables, widths) of the ResNet12 in a file's contents, checked against `arch`."""
  try:
    state_dict = pytorch_weights.backbone_state_dict(contents, path)
    indexed = pytorch_weights.has_block_index(state_dict)
    variables = pytorch_weights.resnet12_variables_from_torch(state_dict)
  except (KeyError, ValueError) as e:
    raise ImportCheckpointError(f"cannot import the backbone in {path}: "
                                f"{e.args[0] if e.args else e}") from None
  if indexed != arch.block_index:
    layout, guess = (("layerL.0.*", "metaoptnet or feat") if indexed
                     else ("layerL.*", "metadiff or meta_baseline"))
    raise ImportCheckpointError(
        f"the backbone in {path} names its layers {layout}, the layout of {guess}, not of "
        f"--backbone_arch {arch.name}; give the network it was trained with")
  widths = tuple(int(variables["params"][f"layer{i}"]["conv1"]["kernel"].shape[-1])
                 for i in range(1, 5))
  if widths not in WIDTHS:
    known = "; ".join(f"{'-'.join(map(str, w))} ({n})" for w, n in WIDTHS.items())
    raise ImportCheckpointError(f"the backbone in {path} has widths {'-'.join(map(str, widths))}"
                                f", which no configured ResNet12 has: {known}")
  return variables, widths


def _head_params(contents, path: str, use_ema: bool, config):
  """The TCUNet params of the head in a file's contents (schedule buffers checked)."""
  try:
    state_dict = pytorch_weights.head_state_dict(contents, path)
    return pytorch_weights.tcunet_params_from_torch(state_dict, use_ema=use_ema,
                                                 schedule=schedule.from_config(config))
  except (KeyError, ValueError) as e:
    msg = e.args[0] if e.args else str(e)
    if "use_ema" in msg:
      msg = ("--use_ema asks for the EMA copy (ema_model.*), but the head has none; drop "
             "--use_ema to import model.*")
      raise ImportCheckpointError(f"{path}: {msg}") from None
    hint = "; set config.diffusion to the schedule it was trained with" if "schedule" in msg \
        else ""
    raise ImportCheckpointError(f"cannot import the head in {path}: {msg}{hint}") from None


# ----------------------------------------------------------------------------- the config

def _start_config(config, workdir: str, head_only: bool, has_config: bool):
  """(a private copy of the config to start from, where it came from)."""
  if config is None:
    if head_only and has_config:
      return copy.deepcopy(config_lib.load_workdir_config(workdir)), \
          os.path.join(workdir, config_lib.WORKDIR_CONFIG)
    config = DEFAULT_CONFIG
  if isinstance(config, (str, os.PathLike)):
    path, _, arg = os.fspath(config).partition(":")
    if not os.path.exists(path):
      raise ImportCheckpointError(f"no config file {path}; give a file of configs/ (with "
                                  "optional presets after a colon, e.g. "
                                  "configs/miniimagenet_resnet12.py:shot=1)")
    try:
      loaded = config_lib.load_config_file(path, arg or None)
    except UserError as e:
      raise ImportCheckpointError(f"config {config}: {e}") from None
    return loaded, os.fspath(config)
  return copy.deepcopy(config), "the given config"


def _set_normalization(config, arch: Arch) -> dict:
  """Sets config.data.augment.mean/std to the network's, where it is known and differs."""
  name = config.data.name
  current = augment.from_config(config.data)
  own = config.data.augment.mean is not None or config.data.augment.std is not None
  theirs = arch.normalization.get(name)
  if theirs is None or own:
    return {"mean": _tuple(current.mean), "std": _tuple(current.std), "set": False}
  mean, std = (_tuple(v) for v in theirs)
  if np.allclose(mean, current.mean, atol=1e-9) and np.allclose(std, current.std, atol=1e-9):
    return {"mean": mean, "std": std, "set": False}
  config.data.augment.mean = mean
  config.data.augment.std = std
  return {"mean": mean, "std": std, "set": True}


def _tuple(values) -> tuple:
  return tuple(float(v) for v in values)


def _data_shape(config, image_shape, base_classes):
  """(image shape, base classes, base images, where from) for the pretraining state."""
  if image_shape is not None or base_classes is not None:
    if image_shape is None or base_classes is None:
      raise ImportCheckpointError("give --image_size H,W,C and --base_classes N together")
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3 or min(shape) < 1 or int(base_classes) < 1:
      raise ImportCheckpointError(f"--image_size must be H,W,C and --base_classes >= 1, got "
                                  f"{image_shape!r} and {base_classes!r}")
    return shape, int(base_classes), int(base_classes), "given"
  # tensorflow-datasets: imported only where a dataset is read
  from metadiff_jax.data import load, spec  # pylint: disable=g-import-not-at-top
  try:
    load.dataset_dir(embedding.dataset_ref(config))
  except UserError:
    pass
  else:
    shape, num_images = pretraining.base_split_shape(config)
    return tuple(shape), embedding.num_classes(config, "train"), num_images, "the built dataset"
  try:
    standard = spec.standard_spec(config.data.name)
  except ValueError:
    raise ImportCheckpointError(
        f"the dataset {config.data.name!r} is not built, so the backbone's input size and the "
        f"base-class count are unknown: build it ({embedding.dataset_ref(config).build_command()}"
        "), or give --image_size H,W,C --base_classes N") from None
  num_base = standard.num_classes("train")
  return standard.image_shape, num_base, num_base * (standard.images_per_class or 1), \
      f"the standard {config.data.name} spec"


def _check_kept(existing: dict, config, workdir: str) -> None:
  """What the workdir holds and keeps must be read with the config it was written with: the
  backbone with the same backbone and data sections, the heads also with the same denoiser
  and diffusion sections."""
  kept, sections = [], []
  if existing["backbone"] is not None:
    kept.append("a backbone (pretrain/best)")
    sections += ["backbone", "data"]
  if existing["heads"]:
    kept.append(f"denoisers ({', '.join(f'train_{k}shot' for k in sorted(existing['heads']))})")
    sections += ["denoiser", "diffusion"]
  if not kept:
    return
  old = existing["config"]
  if old is None:
    if not existing["heads"]:
      return  # a backbone without config.json: the template check above suffices
    changed = sections
  else:
    def plain(c, section):
      return json.loads(json.dumps(c[section].to_dict(), default=list))
    changed = [s for s in sections if plain(old, s) != plain(config, s)]
  if changed:
    raise ImportCheckpointError(
        f"{workdir} holds {' and '.join(kept)} written with another config than this import "
        f"writes (config.{', config.'.join(changed)}); choose an empty --workdir (nothing "
        "there was changed)")


def _head_template(config, feature_dim: int, shots: int):
  """The params shapes of the configured K-shot denoiser, as `method.MetaDiff.init` inits it."""
  model = method.denoiser(config, feature_dim)
  ways = config.train.ways
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((ways, model.feature_dim)), 0,
      jnp.zeros((ways * shots, feature_dim)), jnp.repeat(jnp.arange(ways), shots)))["params"]


def _head_state(config, feature_dim: int, params):
  """The `DiffusionState` of `method.MetaDiff.init` with `params` as its params and EMA params
  (built here without the eager init that `init` would run)."""
  model = method.denoiser(config, feature_dim)
  params = jax.tree.map(jnp.asarray, params)
  t = config.train
  return train_state.DiffusionState.create(
      apply_fn=model.apply, params=params, tx=train_state.adam_l2(t.learning_rate,
                                                                  t.weight_decay),
      ema_params=jax.tree.map(jnp.copy, params))


def _check_head_fits(template, params, path: str, feature_dim: int, backbone_from: str):
  """The first layer of the head (in PyTorch names) whose shape the backbone does not fit."""
  names = {flax: name for name, flax in pytorch_weights.LAYER_NAMES}
  order = ["proto_inf1", "proto_inf5", *(f for f in names if f not in ("proto_inf1",
                                                                        "proto_inf5"))]
  for layer in order:
    for field, torch_field in (("kernel", "weight"), ("bias", "bias")):
      want = tuple(np.shape(template[layer][field]))
      got = tuple(np.shape(params[layer][field]))
      if want != got:
        flip = (lambda s: s[::-1]) if field == "kernel" else (lambda s: s)
        raise ImportCheckpointError(
            f"the head in {path} does not fit the backbone's {feature_dim}-d features "
            f"({backbone_from}): its `{names[layer]}.{torch_field}` has shape {flip(got)} "
            f"where {flip(want)} is needed; import the head with the backbone it was trained on")


# ----------------------------------------------------------------------------- the workdir

def _existing(workdir: str) -> dict:
  """What the workdir holds already, read without creating anything: {"config": ConfigDict or
  None, "backbone": (variables, metadata) or None, "heads": {K: params}}."""
  out = {"config": None, "backbone": None, "heads": {}}
  if not os.path.isdir(workdir):
    return out
  if os.path.exists(os.path.join(workdir, config_lib.WORKDIR_CONFIG)):
    try:
      out["config"] = config_lib.load_workdir_config(workdir)
    except UserError:
      out["config"] = None
  saved = checkpoint_lib.read_latest(workdir_lib.backbone_dir(workdir))
  if saved is not None:
    state, meta = saved
    out["backbone"] = (pretraining.backbone_variables(state), meta)
  for k in workdir_lib.shots_in(workdir):
    saved = checkpoint_lib.read_latest(os.path.join(workdir_lib.train_dir(workdir, k), "best"))
    if saved is not None:
      out["heads"][k] = saved[0]["ema_params"]
  return out


def _same_arrays(a, b) -> bool:
  """Whether two pytrees have the same paths and equal arrays."""
  def flat(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
  fa, fb = flat(a), flat(b)
  return fa.keys() == fb.keys() and all(
      fa[k].shape == fb[k].shape and np.array_equal(fa[k], fb[k]) for k in fa)


# ----------------------------------------------------------------------------- the command

def _image_size(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(d) for d in text.replace("x", ",").split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--image_size must be H,W,C, got {text!r}") from None
  if len(shape) != 3:
    raise argparse.ArgumentTypeError(f"--image_size must be H,W,C, got {text!r}")
  return shape


def main(argv=None) -> int:
  """The command line; returns the exit status (2 for a problem the user can fix)."""
  parser = errors.ArgumentParser(
      prog="python -m metadiff_jax.import_torch",
      description="Write PyTorch MetaDiff / ResNet12 checkpoints into a workdir as the "
                  "pipeline's own checkpoints (docs/IMPORTING.md).")
  parser.add_argument("--checkpoint", help="the original MetaDiff's one file {'embedding', "
                      "'head'} (.pth, or .npz of its flattened names)")
  parser.add_argument("--head", help="the head alone (.pth or .npz)")
  parser.add_argument("--backbone", help="the backbone alone (.pth or .npz)")
  parser.add_argument("--backbone_arch", help=f"the backbone's network: {', '.join(ARCHS)}")
  parser.add_argument("--workdir", required=True, help="the workdir to write")
  parser.add_argument("--config", help="config file[:presets] to start from (default: "
                      "configs/miniimagenet_resnet12.py)")
  parser.add_argument("--shots", type=int, help="K, the shot setting the head was trained for")
  parser.add_argument("--use_ema", action="store_true",
                      help="take the head's ema_model.* copy instead of model.*")
  parser.add_argument("--trusted", action="store_true", help="let torch.load unpickle Python "
                      "objects besides tensors (only for files you trust)")
  parser.add_argument("--image_size", type=_image_size, help="H,W,C of the backbone's input, "
                      "where the dataset is neither built nor a standard benchmark")
  parser.add_argument("--base_classes", type=int, help="the number of base classes (with "
                      "--image_size)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  try:
    summary = import_checkpoint(
        args.workdir, checkpoint=args.checkpoint, head=args.head, backbone=args.backbone,
        arch=args.backbone_arch, config=args.config, shots=args.shots, use_ema=args.use_ema,
        trusted=args.trusted, image_shape=args.image_size, base_classes=args.base_classes)
  except (UserError, OSError) as e:  # OSError: e.g. a workdir that cannot be written
    return errors.report(e)
  print(format_summary(summary), flush=True)
  return 0


def format_summary(summary: dict) -> str:
  """A few lines: what was imported and written, and the commands that use it."""
  lines = []
  b, h = summary["backbone"], summary["head"]
  if b:
    lines.append(f"backbone: {b['name']} ({'-'.join(map(str, b['widths']))}, arch {b['arch']}, "
                 f"activate_last={b['activate_last']}) from {b['from']}")
  if h:
    lines.append(f"head: {h['shots']}-shot, {'ema_model' if h['use_ema'] else 'model'}.* of "
                 f"{h['from']} (feature_dim {h['feature_dim']}, hidden {h['hidden_dims']}, "
                 f"time embedding {h['time_embed_dim']})")
  n = summary["normalization"]
  lines.append(f"input {'x'.join(map(str, summary['image_shape']))}, normalisation mean "
               f"{tuple(round(v, 4) for v in n['mean'])} std "
               f"{tuple(round(v, 4) for v in n['std'])}"
               + (" (the network's, set in the config)" if n["set"] else ""))
  for note in summary["notes"]:
    lines.append(f"note: {note}")
  for path in summary["reused"]:
    lines.append(f"kept {path} (the same weights)")
  for path in summary["written"]:
    lines.append(f"wrote {path}")
  c = summary["commands"]
  lines += ["evaluate (needs the dataset built):", f"  {c['eval']}",
            "classify your own images:", f"  {c['predict']}"]
  return "\n".join(lines)


if __name__ == "__main__":
  errors.exit_command(main())
