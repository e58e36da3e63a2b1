"""What the benchmark scripts share: the machine's description, the JSON writer, the flags of
a synthetic few-shot problem, the NumPy augmentation baseline and the diffusion head's
training step.

The scripts run as `python benchmarks/x.py`, which puts this folder on `sys.path`; they import
this module as `import bench_common`. It imports neither the stages nor the config and data
stacks (no ml_collections or tensorflow-datasets), as the scripts that run on accelerator
machines without them require.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

from metadiff_jax.train_state import diffusion_step


def machine() -> dict:
  """The device, backend, host and JAX version a result was measured with, and the date."""
  return dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
              cpu_count=os.cpu_count(), processor=platform.processor() or platform.machine(),
              jax_version=jax.__version__, date=time.strftime("%Y-%m-%d"))


def write_json(path, result) -> pathlib.Path:
  """Writes `result` as indented JSON to `path` (parents made); returns the path."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  return out


def add_few_shot_args(parser, *, classes: int, images_per_class: int, steps_help: str) -> None:
  """Adds the flags of a synthetic few-shot problem to an `argparse` parser.

  Args:
    parser: the script's `argparse.ArgumentParser`.
    classes, images_per_class: the defaults of --classes and --images_per_class, the size of
      the synthetic split.
    steps_help: the help of --steps, T (default 1000).

  The episodes are --ways 5 and --shots 1 by default.
  """
  parser.add_argument("--classes", type=int, default=classes)
  parser.add_argument("--images_per_class", type=int, default=images_per_class)
  parser.add_argument("--ways", type=int, default=5)
  parser.add_argument("--shots", type=int, default=1)
  parser.add_argument("--steps", type=int, default=1000, help=steps_help)


def numpy_augment(images: np.ndarray, config, rng: np.random.Generator) -> np.ndarray:
  """The host baseline's transforms: `augment.augment_image` in NumPy, one image at a time.

  Uint8 images [B, H, W, C] (C = 1 or 3) to normalised float32, as a data-loader worker's
  transforms run: random crop with `config.crop_padding` zero padding, horizontal flip,
  brightness, contrast and (three channels only) saturation jitter, each where `config` turns
  it on, then `(x - mean) / std`. `config` is an `augment.AugmentConfig`.
  """
  pad = config.crop_padding
  mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
  weights = np.asarray([0.299, 0.587, 0.114], np.float32)[:, None]
  grey = (lambda x: x) if images.shape[-1] == 1 else (lambda x: x @ weights)
  out = np.empty(images.shape, np.float32)
  h, w = images.shape[1:3]
  for b, image in enumerate(images):
    x = image.astype(np.float32) / 255
    if pad:
      x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
      dy, dx = rng.integers(0, 2 * pad + 1, 2)
      x = x[dy:dy + h, dx:dx + w]
    if config.flip and rng.random() < 0.5:
      x = x[:, ::-1]
    if config.brightness:
      x = np.clip(x * rng.uniform(1 - config.brightness, 1 + config.brightness), 0, 1)
    if config.contrast:
      m = grey(x).mean()
      x = np.clip(m + rng.uniform(1 - config.contrast, 1 + config.contrast) * (x - m), 0, 1)
    if config.saturation and images.shape[-1] == 3:
      g = grey(x)
      x = np.clip(g + rng.uniform(1 - config.saturation, 1 + config.saturation) * (x - g), 0, 1)
    out[b] = (x - mean) / std
  return out


def diffusion_train_step(model, ema_decay: float, ema_start_step: int = 2000):
  """`train_state.diffusion_step` (the train stage's scan body) with the model and EMA bound:
  `step(state, sched, w0, support, labels, key) -> (state, loss)`. Not jitted."""
  return functools.partial(diffusion_step, model, ema_decay=ema_decay,
                           ema_start_step=ema_start_step)
