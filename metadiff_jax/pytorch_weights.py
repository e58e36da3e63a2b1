"""Imports the original PyTorch MetaDiff's weights: the denoiser (TCUNet) and the backbone.

A state dict of the original head names its layers `time_scale.0`, `time_scale.2`,
`time_emb1..5` and `proto_inf1..5` (PyTorch `nn.Linear`: `weight` [out, in], `bias` [out],
y = x W^T + b). A checkpoint of the original's diffusion wrapper stores them as
`model.<name>` with an EMA copy as `ema_model.<name>`, beside the schedule buffers (`betas`,
`alphas_cumprod`, ...), which are not parameters; a model wrapped in `DataParallel` adds a
`module.` prefix. All of these layouts are accepted.

The backbone: `resnet12_variables_from_torch` maps a ResNet12 state dict (`layerL.convC.weight`,
`layerL.bnC.*`, `layerL.downsample.{0,1}.*`, or the same under `layerL.0.` where each layer is
an `nn.Sequential` of one block, as MetaOptNet and FEAT write it) onto `backbones.ResNet12`'s
variables, and `load_backbone_file` reads one from a file and checks it against the configured
model with `check_variables_fit`. `read_checkpoint` reads a whole file once;
`head_state_dict` and `backbone_state_dict` find the two parts in it (`import_torch` writes
them into a workdir; docs/IMPORTING.md lists the layouts).

Only reading a `.pth` file needs PyTorch (`pip install 'metadiff_jax[torch]'`); the converters
take dicts of numpy arrays or torch tensors.
"""

from __future__ import annotations

import re
import zipfile
from typing import Any, Mapping, Optional

import jax
import numpy as np

from metadiff_jax.schedule import Schedule

LAYER_NAMES = (
    ("time_scale.0", "time_scale_0"),
    ("time_scale.2", "time_scale_2"),
    *((f"time_emb{b}", f"time_emb{b}") for b in range(1, 6)),
    *((f"proto_inf{b}", f"proto_inf{b}") for b in range(1, 6)),
)
# Buffers of the original's diffusion wrapper. All are skipped as parameters; those whose
# definition is known are compared with `schedule` when one is given (`sigma` is not).
SCHEDULE_BUFFERS = ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "reciprocal_sqrt_alphas",
                    "remove_noise_coeff", "sigma")
_PREFIXES = {False: "model.", True: "ema_model."}


def tcunet_params_from_torch(state_dict: Mapping[str, Any], use_ema: bool = False,
                             schedule: Optional[Schedule] = None, atol: float = 1e-6):
  """Converts a PyTorch state dict of the original denoiser into TCUNet params.

  Args:
    state_dict: name -> tensor (numpy array or torch tensor), in any layout above.
    use_ema: take the `ema_model.*` copy instead of `model.*`. The default is `model.*`
      because the original training script never updates the EMA copy, which stays the
      initial random network.
    schedule: if given, schedule buffers stored in the state dict are checked against it.
    atol: tolerance of that check.

  Returns:
    The `params` collection for `TCUNet`: {"proto_inf1": {"kernel": [in, out], "bias": [out]},
    ...}; build the module with `tcunet_config_from_params(params)` if its sizes are unknown.
  """
  tensors = {_strip_module(k): _to_numpy(v) for k, v in state_dict.items()}
  wrapped = any(k.startswith(tuple(_PREFIXES.values())) for k in tensors)
  if use_ema and not any(k.startswith(_PREFIXES[True]) for k in tensors):
    raise KeyError("use_ema=True but the state dict has no `ema_model.*` entries; "
                   "drop use_ema to import `model.*`")
  prefix = _PREFIXES[use_ema] if wrapped else ""
  params = {}
  for torch_name, flax_name in LAYER_NAMES:
    weight, bias = (tensors.get(f"{prefix}{torch_name}.{p}") for p in ("weight", "bias"))
    if weight is None or bias is None:
      raise KeyError(
          f"the state dict has no `{prefix}{torch_name}.weight`/`.bias`; is this a checkpoint "
          f"of the original MetaDiff denoiser? Its keys start: {sorted(tensors)[:6]}")
    if weight.ndim != 2 or bias.shape != weight.shape[:1]:
      raise ValueError(f"`{prefix}{torch_name}` has weight {weight.shape} and bias {bias.shape}; "
                       "expected nn.Linear weight [out, in] and bias [out]")
    params[flax_name] = {"kernel": weight.T.astype(np.float32), "bias": bias.astype(np.float32)}
  unexpected = sorted(
      k for k in tensors if k.startswith(prefix) and not _is_known(k[len(prefix):]))
  if unexpected:
    raise KeyError(f"unexpected entries under `{prefix or '(no prefix)'}`: {unexpected[:8]}")
  if schedule is not None:
    _check_schedule_buffers(tensors, schedule, atol)
  return params


def tcunet_config_from_params(params) -> dict:
  """The TCUNet constructor arguments that fit imported params (feature, hidden, time dims)."""
  return dict(
      feature_dim=int(params["proto_inf1"]["kernel"].shape[0]),
      hidden_dims=(int(params["proto_inf1"]["kernel"].shape[1]),
                   int(params["proto_inf2"]["kernel"].shape[1])),
      time_embed_dim=int(params["time_emb1"]["kernel"].shape[0]),
  )


def load_torch_state_dict(path, trusted: bool = False) -> dict:
  """Reads a `.pth` checkpoint into a flat dict of numpy arrays; needs PyTorch.

  Args:
    path: the file.
    trusted: also unpickle Python objects other than tensors and containers. Only for files
      from a source you trust: unpickling can run arbitrary code.
  """
  checkpoint = _read_torch_checkpoint(path, trusted)
  for key in ("state_dict", "model_state_dict"):
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
      checkpoint = checkpoint[key]
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
  return {k: _to_numpy(v) for k, v in checkpoint.items() if hasattr(v, "shape")}


def tcunet_params_from_torch_file(path, use_ema: bool = False,
                                  schedule: Optional[Schedule] = None, trusted: bool = False):
  """`tcunet_params_from_torch` of a `.pth` file (needs PyTorch) or an `.npz` file."""
  if str(path).endswith(".npz"):
    state_dict = _read_npz(path)
  else:
    state_dict = load_torch_state_dict(path, trusted=trusted)
  return tcunet_params_from_torch(state_dict, use_ema=use_ema, schedule=schedule)


def _read_torch_checkpoint(path, trusted: bool):
  """Whatever `torch.load` finds in `path` (tensors only unless `trusted`); needs PyTorch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ImportError(
        f"reading {path} needs PyTorch, which is optional: pip install 'metadiff_jax[torch]', "
        "or convert the file to .npz where PyTorch is installed") from err
  try:
    return torch.load(path, map_location="cpu", weights_only=not trusted)
  except FileNotFoundError:
    raise
  except Exception as err:  # torch raises several types for unreadable files
    hint = ("" if trusted else "; if it holds Python objects besides tensors and you trust "
            "its source, pass trusted=True")
    raise ValueError(f"cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''}){hint}") from err


def _read_npz(path) -> dict:
  try:
    with np.load(path) as archive:
      return dict(archive)
  except FileNotFoundError:
    raise
  except (OSError, ValueError, zipfile.BadZipFile) as err:
    raise ValueError(f"cannot read {path} as an .npz archive ({err}); is the file complete?"
                     ) from err


def _strip_module(key: str) -> str:
  """Drops `module.` segments added by DataParallel, wherever they sit."""
  return re.sub(r"(^|\.)module\.", r"\1", key)


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, converted without importing torch
    value = value.detach().cpu().float().numpy() if value.is_floating_point() else (
        value.detach().cpu().numpy())
  return np.asarray(value)


def _is_known(name: str) -> bool:
  layer = name.rsplit(".", 1)[0]
  return name in SCHEDULE_BUFFERS or any(layer == t for t, _ in LAYER_NAMES)


def _check_schedule_buffers(tensors, schedule: Schedule, atol: float):
  ours = schedule._asdict()
  for name in SCHEDULE_BUFFERS:
    if name not in tensors or name not in ours:
      continue
    theirs = tensors[name].reshape(-1)
    mine = np.asarray(ours[name])
    if theirs.shape != mine.shape or not np.allclose(theirs, mine, atol=atol, rtol=1e-5):
      raise ValueError(
          f"the checkpoint's schedule buffer `{name}` differs from the given schedule "
          f"(T = {schedule.num_steps}); build the schedule the checkpoint was trained with")


# The backbone: ResNet12 (models/resnet12_2.py of the original MetaDiff; Meta-Baseline's,
# MetaOptNet's and FEAT's name their parameters the same way, up to prefixes).

_RESNET12_LAYERS = 4
# (PyTorch conv, PyTorch BatchNorm, flax conv, flax BatchNorm) within each `layerL`.
_RESNET12_UNITS = (
    *((f"conv{c}", f"bn{c}", f"conv{c}", f"bn{c}") for c in (1, 2, 3)),
    ("downsample.0", "downsample.1", "downsample_conv", "downsample_bn"),
)
# PyTorch BatchNorm entry -> (flax collection, flax name).
_BATCH_NORM_FIELDS = (("weight", "params", "scale"), ("bias", "params", "bias"),
                      ("running_mean", "batch_stats", "mean"),
                      ("running_var", "batch_stats", "var"))
# Where whole-model checkpoints keep the backbone: the original MetaDiff and MetaOptNet save
# {'embedding': backbone, 'head': ...}, Meta-Baseline {'model_sd': ...} and FEAT
# {'params': ...}; common trainers use the others. Meta-Baseline and FEAT prefix the backbone's
# names with `encoder.`.
_BACKBONE_ENTRIES = ("embedding", "state_dict", "model", "model_state_dict", "model_sd",
                     "params")
_BACKBONE_PREFIXES = ("embedding.", "encoder.")
# `layerL.0.` where a layer is an nn.Sequential holding its one block (MetaOptNet, FEAT).
_BLOCK_INDEX = re.compile(r"^(layer[1-4])\.0\.")
_FIT_HINT = "set config.backbone.name/widths to the checkpoint's architecture"


def resnet12_variables_from_torch(state_dict: Mapping[str, Any]) -> dict:
  """Converts a PyTorch ResNet12 state dict into variables of `backbones.ResNet12`.

  Args:
    state_dict: name -> tensor (numpy array or torch tensor) with the original's names:
      `layerL.convC.weight` [out, in, 3, 3], `layerL.bnC.{weight, bias, running_mean,
      running_var}`, `layerL.downsample.0.weight` [out, in, 1, 1], `layerL.downsample.1.*`
      (L = 1..4, C = 1..3), or the same under `layerL.0.` (`has_block_index`), optionally
      under DataParallel's `module.`; `num_batches_tracked` entries are ignored.

  Returns:
    {"params": {"layerL": {"convC": {"kernel": [3, 3, in, out]}, "bnC": {"scale", "bias"},
    "downsample_conv", "downsample_bn"}}, "batch_stats": {"layerL": {"bnC": {"mean", "var"},
    "downsample_bn"}}} as float32 numpy arrays. The widths are the checkpoint's; compare them
    with the configured model's by `check_variables_fit`.
  """
  tensors = {_strip_block_index(_strip_module(k)): _to_numpy(v) for k, v in state_dict.items()}
  used = set()

  def take(name):
    if name not in tensors:
      raise KeyError(f"the state dict has no `{name}`; is this a ResNet12 checkpoint "
                     f"(layer1..4 of conv1..3, bn1..3, downsample)? Its keys start: "
                     f"{sorted(tensors)[:6]}")
    used.add(name)
    return tensors[name].astype(np.float32)

  variables = {"params": {}, "batch_stats": {}}
  for layer in (f"layer{index}" for index in range(1, _RESNET12_LAYERS + 1)):
    params = variables["params"][layer] = {}
    stats = variables["batch_stats"][layer] = {}
    for torch_conv, torch_bn, flax_conv, flax_bn in _RESNET12_UNITS:
      weight = take(f"{layer}.{torch_conv}.weight")
      if weight.ndim != 4:
        raise ValueError(f"`{layer}.{torch_conv}.weight` has shape {weight.shape}; expected a "
                         "convolution weight [out, in, kh, kw]")
      params[flax_conv] = {"kernel": weight.transpose(2, 3, 1, 0)}  # OIHW -> HWIO
      params[flax_bn], stats[flax_bn] = {}, {}
      for torch_field, collection, flax_field in _BATCH_NORM_FIELDS:
        target = params if collection == "params" else stats
        target[flax_bn][flax_field] = take(f"{layer}.{torch_bn}.{torch_field}")
  unexpected = sorted(
      k for k in tensors if k not in used and not k.endswith(".num_batches_tracked"))
  if unexpected:
    raise KeyError(f"unexpected entries in a ResNet12 state dict ({len(unexpected)}): "
                   f"{unexpected[:6]}")
  return variables


def check_variables_fit(expected, actual, what: str = "the checkpoint",
                        hint: str = _FIT_HINT) -> None:
  """Checks that `actual` has exactly the paths and shapes of `expected`.

  Args:
    expected: the variables the configured model expects (arrays or `jax.ShapeDtypeStruct`s,
      e.g. `jax.eval_shape(model.init, key, images)`).
    actual: the variables read from a checkpoint.
    what: names `actual` in the error, e.g. "backbone checkpoint ckpt.pth".
    hint: what to do about a mismatch.

  Raises:
    ValueError: one line naming the first path (`params` first, then in tree order) that is
      missing, extra or of another shape, with both shapes.
  """
  expected_shapes, actual_shapes = _leaf_shapes(expected), _leaf_shapes(actual)
  for path in sorted(expected_shapes.keys() | actual_shapes.keys(),
                     key=lambda p: (not p.startswith("params/"), p)):
    mine, theirs = expected_shapes.get(path), actual_shapes.get(path)
    if theirs is None:
      raise ValueError(f"{what} has no `{path}`, which the configured model expects with shape "
                       f"{mine}; {hint}")
    if mine is None:
      raise ValueError(f"{what} has `{path}` of shape {theirs}, which the configured model "
                       f"lacks; {hint}")
    if mine != theirs:
      raise ValueError(f"{what} has `{path}` of shape {theirs}, but the configured model "
                       f"expects {mine}; {hint}")


def check_backbone_fits(module, image_shape, variables, what: str = "the checkpoint",
                        hint: str = _FIT_HINT) -> None:
  """`check_variables_fit` against the variables `module` has for images of `image_shape`
  (H, W, C), computed from shapes alone (no initialisation is run)."""
  images = jax.ShapeDtypeStruct((1, *(int(d) for d in image_shape)), np.float32)
  template = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), images)
  check_variables_fit(template, variables, what, hint)


def load_backbone_file(path, template_variables, trusted: bool = False) -> dict:
  """Reads a ResNet12 backbone from a `.pth` (needs PyTorch) or `.npz` file.

  The file may hold the backbone's state dict itself, or a whole-model checkpoint with it
  under `embedding` (the original MetaDiff's `{'embedding': ..., 'head': ...}`), `state_dict`,
  `model`, `model_state_dict`, `model_sd` or `params`, or flat names prefixed `embedding.` or
  `encoder.`; DataParallel's `module.` may appear anywhere, and each layer's names may carry a
  block index (`layerL.0.`). An `.npz` holds flat PyTorch names.

  Args:
    path: the file.
    template_variables: the configured `ResNet12`'s variables or their shapes
      (`jax.eval_shape(model.init, key, images)`); the result must fit them.
    trusted: let `torch.load` unpickle Python objects besides tensors (only for trusted files).

  Returns:
    {"params": ..., "batch_stats": ...} as numpy arrays, as `resnet12_variables_from_torch`.
  """
  state_dict = backbone_state_dict(read_checkpoint(path, trusted), path)
  try:
    variables = resnet12_variables_from_torch(state_dict)
  except KeyError as err:
    raise KeyError(f"{path}: {err.args[0]}") from None
  check_variables_fit(template_variables, variables, f"backbone checkpoint {path}")
  return variables


def backbone_state_dict(checkpoint, path) -> dict:
  """The backbone's flat name -> tensor dict in a checkpoint's contents (`read_checkpoint`),
  in any layout `load_backbone_file` takes, `encoder.`/`embedding.` prefixes removed."""
  for _ in range(3):  # a few levels, e.g. {"state_dict": {"embedding": {...}}}
    if not isinstance(checkpoint, Mapping):
      raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    entry = next((e for e in _BACKBONE_ENTRIES if isinstance(checkpoint.get(e), Mapping)), None)
    if entry is None:
      break
    checkpoint = checkpoint[entry]
  tensors = {_strip_module(k): v for k, v in checkpoint.items() if hasattr(v, "shape")}
  if not tensors:
    raise ValueError(f"{path} holds no tensors where a backbone state dict was expected; its "
                     f"entries: {sorted(checkpoint)[:6]}")
  for prefix in _BACKBONE_PREFIXES:
    if any(k.startswith(prefix) for k in tensors):
      return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  return tensors


def read_checkpoint(path, trusted: bool = False):
  """The contents of a checkpoint file: a `.npz` as a flat dict of arrays (PyTorch names such
  as `embedding.module.layer1.conv1.weight`), anything else via `torch.load` (needs PyTorch).

  Raises:
    FileNotFoundError: no such file.
    ImportError: a `.pth` file where PyTorch is not installed (the message says what to do).
    ValueError: a file that cannot be read as either.
  """
  return _read_npz(path) if str(path).endswith(".npz") else _read_torch_checkpoint(path, trusted)


def head_state_dict(checkpoint, path) -> dict:
  """The MetaDiff head's flat name -> tensor dict in a checkpoint's contents.

  Takes the `head` entry of the original's {'embedding': ..., 'head': ...} (or of a
  `state_dict`/`model_state_dict` wrapper around it), the `head.`-prefixed names of a flattened
  `.npz` of that layout, or else the whole dict as the head's own state dict.

  Raises:
    ValueError: the file holds no dict of tensors.
  """
  for key in ("state_dict", "model_state_dict"):
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
      checkpoint = checkpoint[key]
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
  if isinstance(checkpoint.get("head"), Mapping):
    checkpoint = checkpoint["head"]
  elif any(str(k).startswith("head.") for k in checkpoint):
    checkpoint = {k[len("head."):]: v for k, v in checkpoint.items() if str(k).startswith("head.")}
  tensors = {k: v for k, v in checkpoint.items() if hasattr(v, "shape")}
  if not tensors:
    raise ValueError(f"{path} holds no tensors where the head's state dict was expected; its "
                     f"entries: {sorted(map(str, checkpoint))[:6]}")
  return tensors


def has_block_index(state_dict: Mapping[str, Any]) -> bool:
  """Whether a ResNet12 state dict names its layers `layerL.0.*` (MetaOptNet, FEAT) rather than
  `layerL.*` (MetaDiff, Meta-Baseline)."""
  return any(_BLOCK_INDEX.match(_strip_module(k)) for k in state_dict)


def _strip_block_index(key: str) -> str:
  return _BLOCK_INDEX.sub(r"\1.", key)


def _leaf_shapes(tree) -> dict:
  """'collection/module/.../name' -> shape of every leaf of a variables pytree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in keys):
          tuple(leaf.shape) for keys, leaf in leaves}
