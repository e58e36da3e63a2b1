"""Noise schedules of the diffusion over prototype weights.

A schedule is a pytree of arrays (`Schedule`), so it can be passed through `jax.jit` and
`jax.vmap` like any other input; the number of steps `T` is its static length. Time steps are
0-based, t in {0, ..., T-1}, as in the original MetaDiff code (the paper writes 1..T).

The coefficients are computed in float64 with numpy and stored as float32, which matches the
original PyTorch buffers to float32 rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
  """Per-step coefficients of the forward noising and the reverse step, each [T] float32.

  Attributes:
    betas: beta_t, the variance added at step t.
    alphas: alpha_t = 1 - beta_t.
    alphas_cumprod: abar_t = prod_{s<=t} alpha_s (Eq. 2).
    sqrt_alphas_cumprod: sqrt(abar_t), the scale of w0 in w_t.
    sqrt_one_minus_alphas_cumprod: sqrt(1 - abar_t), the scale of the noise in w_t.
    remove_noise_coeff: beta_t / sqrt(1 - abar_t), the factor of eps in the reverse step.
      The paper's Eq. 8 prints sqrt(1 - alpha_t); the original code (and DDPM's Eq. 3) uses
      sqrt(1 - abar_t), which is what this holds.
    reciprocal_sqrt_alphas: 1 / sqrt(alpha_t), the factor gamma of Eq. 6.
    sigmas: sqrt(beta_t), the standard deviation of the stochastic DDPM step (Eq. 3); the
      deterministic sampler of the original does not use it.
  """

  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  remove_noise_coeff: jnp.ndarray
  reciprocal_sqrt_alphas: jnp.ndarray
  sigmas: jnp.ndarray

  @property
  def num_steps(self) -> int:
    """T, the number of diffusion steps (a static Python int)."""
    return self.betas.shape[-1]


def from_betas(betas) -> Schedule:
  """Builds every coefficient from a [T] vector of betas in (0, 1)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f"betas must be a non-empty 1-D vector, got shape {betas.shape}")
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError("every beta must lie in (0, 1); check the schedule's beta_start/beta_end")
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  coeffs = dict(
      betas=betas,
      alphas=alphas,
      alphas_cumprod=alphas_cumprod,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      remove_noise_coeff=betas / np.sqrt(1.0 - alphas_cumprod),
      reciprocal_sqrt_alphas=np.sqrt(1.0 / alphas),
      sigmas=np.sqrt(betas),
  )
  return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in coeffs.items()})


def linear(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """The linear schedule of DDPM and MetaDiff: betas = linspace(beta_start, beta_end, T)."""
  _check_num_steps(num_steps)
  if not 0 < beta_start <= beta_end < 1:
    raise ValueError(
        f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
  return from_betas(np.linspace(beta_start, beta_end, num_steps, dtype=np.float64))


def cosine(num_steps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """The cosine schedule of Nichol & Dhariwal (2021, Eq. 17).

  abar(t) = f(t) / f(0) with f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2, and
  beta_t = min(1 - abar(t + 1) / abar(t), max_beta) for the 0-based step t.
  """
  _check_num_steps(num_steps)
  f = lambda u: math.cos((u / num_steps + offset) / (1 + offset) * math.pi / 2) ** 2
  betas = [min(1 - f(t + 1) / f(t), max_beta) for t in range(num_steps)]
  return from_betas(np.asarray(betas, dtype=np.float64))


def from_config(config) -> Schedule:
  """Builds the schedule named by a config's `diffusion` section (or that section itself).

  Fields: `schedule` ("linear" or "cosine"), `num_steps`, and for "linear" `beta_start`,
  `beta_end`.
  """
  config = config.diffusion if hasattr(config, "diffusion") else config
  if config.schedule == "linear":
    return linear(config.num_steps, config.beta_start, config.beta_end)
  if config.schedule == "cosine":
    return cosine(config.num_steps)
  raise ValueError(
      f"unknown diffusion.schedule {config.schedule!r}: use 'linear' or 'cosine'")


def _check_num_steps(num_steps):
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
