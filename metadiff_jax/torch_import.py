"""Imports the original PyTorch MetaDiff denoiser's weights as TCUNet parameters.

A state dict of the original head names its layers `time_scale.0`, `time_scale.2`,
`time_emb1..5` and `proto_inf1..5` (PyTorch `nn.Linear`: `weight` [out, in], `bias` [out],
y = x W^T + b). A checkpoint of the original's diffusion wrapper stores them as
`model.<name>` with an EMA copy as `ema_model.<name>`, beside the schedule buffers (`betas`,
`alphas_cumprod`, ...), which are not parameters; a model wrapped in `DataParallel` adds a
`module.` prefix. All of these layouts are accepted.

Only reading a `.pth` file needs PyTorch (`pip install 'metadiff_jax[torch]'`); the converters
take dicts of numpy arrays or torch tensors.
"""

from __future__ import annotations

import re
import zipfile
from typing import Any, Mapping, Optional

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
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ImportError(
        f"reading {path} needs PyTorch, which is optional: pip install 'metadiff_jax[torch]', "
        "or convert the file to .npz where PyTorch is installed") from err
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
  except FileNotFoundError:
    raise
  except Exception as err:  # torch raises several types for unreadable files
    hint = ("" if trusted else "; if it holds Python objects besides tensors and you trust "
            "its source, pass trusted=True")
    raise ValueError(f"cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''}){hint}") from err
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
    try:
      with np.load(path) as archive:
        state_dict = dict(archive)
    except FileNotFoundError:
      raise
    except (OSError, ValueError, zipfile.BadZipFile) as err:
      raise ValueError(f"cannot read {path} as an .npz archive ({err}); is the file complete?"
                       ) from err
  else:
    state_dict = load_torch_state_dict(path, trusted=trusted)
  return tcunet_params_from_torch(state_dict, use_ema=use_ema, schedule=schedule)


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
