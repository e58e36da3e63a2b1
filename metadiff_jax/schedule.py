"""Noise schedules of the diffusion over prototype weights.

A schedule is a pytree of arrays (`Schedule`), so it can be passed through `jax.jit` and
`jax.vmap` like any other input; the number of steps `T` is its static length. Time steps are
0-based, t in {0, ..., T-1}, as in the original MetaDiff code (the paper writes 1..T).

The coefficients are computed in float64 with numpy and stored as float32, which matches the
original PyTorch buffers to float32 rounding.

Sampling may run on fewer steps than training (timestep respacing, Nichol & Dhariwal 2021,
"Improved Denoising Diffusion Probabilistic Models", Section 4): `respace` keeps K of the T
steps, tau_0 < ... < tau_{K-1}, and derives a K-step schedule with the same abar at those
steps; its `timesteps` field holds tau, the step index the denoiser (trained on the T-step
schedule) is told at each sampling step. `for_sampling(config)` builds it from a config.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from metadiff_jax.errors import ConfigError


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
    timesteps: [T] int32, the step of the training schedule that the denoiser is told at
      step t: arange(T) for a schedule built from betas, tau for a respaced one (`respace`).
      Training indexes the coefficients by t directly and ignores this field.
  """

  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  remove_noise_coeff: jnp.ndarray
  reciprocal_sqrt_alphas: jnp.ndarray
  sigmas: jnp.ndarray
  timesteps: jnp.ndarray

  @property
  def num_steps(self) -> int:
    """T, the number of diffusion steps (a static Python int)."""
    return self.betas.shape[-1]


def from_betas(betas, timesteps=None) -> Schedule:
  """Builds every coefficient from a [T] vector of betas in (0, 1).

  Args:
    betas: [T] floats in (0, 1), converted to float64 for the derived coefficients.
    timesteps: [T] ints, the denoiser's step at each step (see `Schedule`); None gives
      arange(T), a schedule sampled at its own steps.
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f"betas must be a non-empty 1-D vector, got shape {betas.shape}")
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError("every beta must lie in (0, 1); check the schedule's beta_start/beta_end")
  timesteps = np.arange(betas.size) if timesteps is None else np.asarray(timesteps)
  if timesteps.shape != betas.shape or not np.issubdtype(timesteps.dtype, np.integer):
    raise ValueError(
        f"timesteps must be {betas.size} ints like betas, got {timesteps.dtype} of shape "
        f"{timesteps.shape}")
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
  return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in coeffs.items()},
                  timesteps=jnp.asarray(timesteps, dtype=jnp.int32))


def linear(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """The linear schedule of DDPM and MetaDiff: betas = linspace(beta_start, beta_end, T)."""
  return from_betas(_linear_betas(num_steps, beta_start, beta_end))


def cosine(num_steps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """The cosine schedule of Nichol & Dhariwal (2021, Eq. 17).

  abar(t) = f(t) / f(0) with f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2, and
  beta_t = min(1 - abar(t + 1) / abar(t), max_beta) for the 0-based step t.
  """
  return from_betas(_cosine_betas(num_steps, offset, max_beta))


def from_config(config) -> Schedule:
  """Builds the schedule named by a config's `diffusion` section (or that section itself).

  Fields: `schedule` ("linear" or "cosine"), `num_steps`, and for "linear" `beta_start`,
  `beta_end`. This is the T-step schedule of training; `for_sampling` gives the sampler's.
  """
  return from_betas(_config_betas(_section(config)))


def for_sampling(config) -> Schedule:
  """The sampler's schedule: `from_config`'s, respaced to `num_sampling_steps` steps.

  Reads the fields of `from_config` and `num_sampling_steps` (K; None or absent, as in configs
  that predate it, or K = T gives the full T-step schedule). The respacing is done on the
  float64 betas, so it is as exact as `from_config` itself.

  Raises:
    ValueError: if K is not an int in [1, T].
  """
  section = _section(config)
  betas = _config_betas(section)
  num_sampling_steps = getattr(section, "num_sampling_steps", None)
  tau = space_timesteps(betas.size, num_sampling_steps)
  if tau.size == betas.size:
    return from_betas(betas)
  return from_betas(_respaced_betas(np.cumprod(1.0 - betas), tau), timesteps=tau)


def check_config(diffusion) -> None:
  """Raises a ConfigError where a config's `diffusion` section respaces the sampler to a
  number of steps outside [1, num_steps]."""
  k = diffusion.num_sampling_steps
  if k is not None and (int(k) != k or not 1 <= k <= diffusion.num_steps):
    raise ConfigError(f"config.diffusion.num_sampling_steps must be an integer in [1, "
                      f"num_steps = {diffusion.num_steps}] or None, got {k!r}")


def space_timesteps(num_steps: int, num_sampling_steps) -> np.ndarray:
  """The K steps of a T-step schedule that a K-step sampler visits (Nichol & Dhariwal 2021).

  Evenly spaced, tau_i = round(i (T - 1) / (K - 1)) (halves rounded up), so that the sampler
  starts at the noisiest step T-1 and ends at step 0, which gives the clean weights. For
  K = 1 the one step is T-1: a single jump from noise, w_0 = (w - sqrt(1 - abar) eps) /
  sqrt(abar) at abar = abar_{T-1}.

  Args:
    num_steps: T, the length of the schedule.
    num_sampling_steps: K in [1, T]; None means T.

  Returns:
    tau: [K] int64, strictly increasing steps in [0, T); arange(T) for K = T.

  Raises:
    ValueError: if K is not an int in [1, T].
  """
  _check_num_steps(num_steps)
  k = num_steps if num_sampling_steps is None else num_sampling_steps
  if (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= num_steps):
    raise ValueError(
        f"num_sampling_steps must be an int in [1, T = {num_steps}] (or None for all T "
        f"steps), got {num_sampling_steps!r}")
  if k == 1:
    return np.array([num_steps - 1], dtype=np.int64)
  # Integer arithmetic rounds exactly (halves up): with spacing (T-1)/(K-1) >= 1 the steps are
  # strictly increasing, which numpy's round-half-to-even would not guarantee.
  i = np.arange(k, dtype=np.int64)
  tau = (2 * i * (num_steps - 1) + (k - 1)) // (2 * (k - 1))
  assert tau[0] == 0 and tau[-1] == num_steps - 1 and np.all(np.diff(tau) > 0), tau
  return tau


def respace(sched: Schedule, num_sampling_steps) -> Schedule:
  """A K-step schedule visiting K evenly spaced steps of `sched` (`space_timesteps`).

  Nichol & Dhariwal 2021, Section 4: at the kept steps tau, abar'_i = abar_{tau_i}, and
  beta'_i = 1 - abar'_i / abar'_{i-1} (beta'_0 = 1 - abar'_0); the other coefficients follow
  from these betas as in `from_betas`, so the reverse step of Eq. 8 with them jumps from
  tau_i to tau_{i-1}. `timesteps` becomes sched.timesteps[tau], so a respaced schedule can be
  respaced again.

  abar is recomputed in float64 from the float32 betas and alphas of `sched`, which agrees
  with the float64 values it was built from to about float32 rounding; `for_sampling` respaces
  the float64 betas of a config instead. K = T (or None) returns `sched` itself, bit for bit.

  Args:
    sched: the T-step schedule.
    num_sampling_steps: K in [1, T], or None for T.

  Returns:
    The K-step schedule.
  """
  return respace_at(sched, space_timesteps(sched.num_steps, num_sampling_steps))


def respace_at(sched: Schedule, steps) -> Schedule:
  """`respace` at a given strictly increasing sequence of steps of `sched`, [K] ints in [0, T).

  Improved DDPM allows any subsequence; the last step of the sequence is where the sampler
  starts (normally T-1) and the first is the last step it takes (normally 0).
  """
  steps = np.asarray(steps)
  num_steps = sched.num_steps
  if (steps.ndim != 1 or steps.size == 0 or not np.issubdtype(steps.dtype, np.integer)
      or steps[0] < 0 or steps[-1] >= num_steps or np.any(np.diff(steps) <= 0)):
    raise ValueError(
        f"steps must be a non-empty, strictly increasing int sequence in [0, {num_steps}), "
        f"got {steps!r}")
  if steps.size == num_steps:  # every step: the schedule itself, bit for bit
    return sched
  # The float64 alphas again, from whichever float32 vector holds each one more exactly: 1 -
  # beta for small betas (beta carries ~24 bits, 1 - beta rounded to float32 would not), the
  # stored alpha for betas near 1 (the cosine schedule's clipped 0.999).
  betas = np.asarray(sched.betas, dtype=np.float64)
  alphas = np.where(betas < 0.5, 1.0 - betas, np.asarray(sched.alphas, dtype=np.float64))
  return from_betas(_respaced_betas(np.cumprod(alphas), steps),
                    timesteps=np.asarray(sched.timesteps)[steps])


def _respaced_betas(alphas_cumprod, steps) -> np.ndarray:
  """beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}, beta'_0 = 1 - abar_{tau_0}, in float64."""
  kept = np.asarray(alphas_cumprod, dtype=np.float64)[steps]
  previous = np.concatenate([[1.0], kept[:-1]])
  return 1.0 - kept / previous


def _section(config):
  return config.diffusion if hasattr(config, "diffusion") else config


def _config_betas(section) -> np.ndarray:
  if section.schedule == "linear":
    return _linear_betas(section.num_steps, section.beta_start, section.beta_end)
  if section.schedule == "cosine":
    return _cosine_betas(section.num_steps)
  raise ValueError(
      f"unknown diffusion.schedule {section.schedule!r}: use 'linear' or 'cosine'")


def _linear_betas(num_steps, beta_start, beta_end) -> np.ndarray:
  _check_num_steps(num_steps)
  if not 0 < beta_start <= beta_end < 1:
    raise ValueError(
        f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
  return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def _cosine_betas(num_steps, offset=0.008, max_beta=0.999) -> np.ndarray:
  _check_num_steps(num_steps)
  f = lambda u: math.cos((u / num_steps + offset) / (1 + offset) * math.pi / 2) ** 2
  return np.asarray([min(1 - f(t + 1) / f(t), max_beta) for t in range(num_steps)],
                    dtype=np.float64)


def _check_num_steps(num_steps):
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
