"""The diffusion over prototype weights: forward noising, the training loss, the sampler.

- Training (Algorithm 1, Eq. 12): w_t = sqrt(abar_t) w0 + sqrt(1 - abar_t) eps with
  t ~ U{0..T-1} and eps ~ N(0, I) per episode; the loss is the mean of (eps_theta - eps)^2 over
  all entries of the batch.
- Inference (Algorithm 2, Eq. 8 as the original code runs it): starting from w_T ~ N(0, I),
  w_{t-1} = (w_t - beta_t / sqrt(1 - abar_t) * eps_theta(w_t, S, t)) / sqrt(alpha_t)
  for t = T-1, ..., 0, with no noise term. The whole loop is one `lax.scan`; the support set's
  class sums and counts are computed once per episode, before it.

The model is any Flax module with TCUNet's interface: `__call__(w_t, t, support, labels)` for
training and `denoise(w_t, t, stats)` for the sampler. Functions named `*_batch` and `loss*`
take a leading episode axis B and vmap over it; `sample` works on one episode.
"""

from __future__ import annotations

import collections
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from metadiff_jax import prototypes
from metadiff_jax.schedule import Schedule

# How often each compiled entry point has been traced, so that tests can assert that it
# compiles once per input shape.
TRACE_COUNTS: collections.Counter = collections.Counter()


def q_sample(sched: Schedule, w0, t, noise):
  """Forward noising: sqrt(abar_t) w0 + sqrt(1 - abar_t) noise.

  Args:
    sched: the schedule.
    w0: [..., N, D] clean weights.
    t: [...] int steps, one per episode.
    noise: like `w0`.
  """
  scale = sched.sqrt_alphas_cumprod[t][..., None, None]
  sigma = sched.sqrt_one_minus_alphas_cumprod[t][..., None, None]
  return scale * w0 + sigma * noise


def reverse_step(sched: Schedule, w_t, eps, t):
  """One deterministic reverse step, w_{t-1} = (w_t - c_t eps) / sqrt(alpha_t) (Eq. 8).

  c_t = beta_t / sqrt(1 - abar_t), as in the original code (the paper prints 1 - alpha_t).
  """
  return (w_t - sched.remove_noise_coeff[t] * eps) * sched.reciprocal_sqrt_alphas[t]


def loss_from_noise(model, variables, sched: Schedule, w0, support, support_labels, t, noise):
  """Eq. 12 for given steps and noise.

  Args:
    model: the denoiser module (e.g. `TCUNet`).
    variables: its variables, {"params": ...}.
    sched: the schedule.
    w0: [B, N, D] target weights.
    support: [B, S, D] support features.
    support_labels: [B, S] ints in [0, N).
    t: [B] int steps in [0, T).
    noise: [B, N, D] the noise added to `w0`.

  Returns:
    The mean over all B * N * D entries of (eps_theta(w_t, S, t) - noise)^2.
  """
  _check_args(w0, support, support_labels, "w0", batched=True)
  if jnp.shape(noise) != jnp.shape(w0):
    raise ValueError(f"`noise` must have the shape of `w0` {jnp.shape(w0)}, got {jnp.shape(noise)}")
  if jnp.shape(t) != jnp.shape(w0)[:1] or not jnp.issubdtype(jnp.result_type(t), jnp.integer):
    raise TypeError(
        f"`t` must be [B] = [{jnp.shape(w0)[0]}] integer steps, got {jnp.result_type(t)} "
        f"of shape {jnp.shape(t)}")
  prototypes.check_in_range(t, sched.num_steps, "t")
  w_t = q_sample(sched, w0, t, noise)
  eps = jax.vmap(model.apply, in_axes=(None, 0, 0, 0, 0))(
      variables, w_t, t, support, support_labels)
  return jnp.mean(jnp.square(eps - noise))


def loss(model, variables, sched: Schedule, w0, support, support_labels, key):
  """Eq. 12 with t ~ U{0..T-1} and eps ~ N(0, I) drawn per episode from `key`.

  Shapes as in `loss_from_noise`; differentiate it with respect to `variables`.
  """
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, jnp.shape(w0)[:1], 0, sched.num_steps)
  noise = jax.random.normal(noise_key, jnp.shape(w0), jnp.result_type(w0))
  return loss_from_noise(model, variables, sched, w0, support, support_labels, t, noise)


def sample(model, variables, sched: Schedule, w_T, support, support_labels, *,
           trajectory_every: Optional[int] = None):
  """Denoises one episode's weights from step T-1 down to 0.

  Args:
    model: the denoiser module.
    variables: its variables.
    sched: the schedule.
    w_T: [N, D] starting weights, N(0, I) in MetaDiff.
    support: [S, D] support features.
    support_labels: [S] ints in [0, N).
    trajectory_every: if set to k (dividing T), also return the weights every k steps.

  Returns:
    w0: [N, D]; with `trajectory_every=k` the pair (w0, trajectory), where trajectory is
    [T // k + 1, N, D] and entry j holds the weights after j * k reverse steps (entry 0 is
    w_T, the last is w0).
  """
  _check_args(w_T, support, support_labels, "w_T", batched=False)
  _check_trajectory_every(trajectory_every, sched.num_steps)
  return _sample_jit(model, variables, sched, w_T, support, support_labels, trajectory_every)


def sample_batch(model, variables, sched: Schedule, w_T, support, support_labels, *,
                 trajectory_every: Optional[int] = None):
  """`sample` over a leading episode axis, in one compiled call (once per input shape).

  Args:
    w_T: [B, N, D]; support: [B, S, D]; support_labels: [B, S]; the rest as in `sample`.

  Returns:
    w0: [B, N, D], or (w0, trajectory [B, T // k + 1, N, D]) with `trajectory_every=k`.
  """
  _check_args(w_T, support, support_labels, "w_T", batched=True)
  _check_trajectory_every(trajectory_every, sched.num_steps)
  return _sample_batch_jit(
      model, variables, sched, w_T, support, support_labels, trajectory_every)


def _sample_episode(model, variables, sched, w_T, support, support_labels, trajectory_every):
  """The reverse loop for one episode; traced, never called on host arrays directly."""
  # Constant over the loop: hoisted out of the scan.
  stats = prototypes.support_stats(support, support_labels, w_T.shape[0])

  def step(w, t):
    eps = model.apply(variables, w, t, stats, method="denoise")
    return reverse_step(sched, w, eps, t), None

  num_steps = sched.num_steps
  steps = jnp.arange(num_steps - 1, -1, -1)
  if trajectory_every is None:
    w0, _ = jax.lax.scan(step, w_T, steps)
    return w0

  def chunk(w, chunk_steps):
    w, _ = jax.lax.scan(step, w, chunk_steps)
    return w, w

  w0, trajectory = jax.lax.scan(chunk, w_T, steps.reshape(-1, trajectory_every))
  return w0, jnp.concatenate([w_T[None], trajectory], axis=0)


@functools.partial(jax.jit, static_argnames=("model", "trajectory_every"))
def _sample_jit(model, variables, sched, w_T, support, support_labels, trajectory_every):
  TRACE_COUNTS["sample"] += 1
  return _sample_episode(model, variables, sched, w_T, support, support_labels, trajectory_every)


@functools.partial(jax.jit, static_argnames=("model", "trajectory_every"))
def _sample_batch_jit(model, variables, sched, w_T, support, support_labels, trajectory_every):
  TRACE_COUNTS["sample_batch"] += 1
  one = functools.partial(
      _sample_episode, model, variables, sched, trajectory_every=trajectory_every)
  return jax.vmap(one)(w_T, support, support_labels)


def _check_args(w, support, support_labels, name, batched):
  """Ranks, episode counts, feature dims and label dtype at trace time; label values on host.

  Label values are checked only where they are concrete; under a trace `support_stats` turns
  out-of-range labels into NaN instead.
  """
  shapes = {name: jnp.shape(w), "support": jnp.shape(support),
            "support_labels": jnp.shape(support_labels)}
  if batched:
    layouts = {name: "[B, N, D]", "support": "[B, S, D]", "support_labels": "[B, S]"}
    for arg, layout in layouts.items():
      if len(shapes[arg]) != layout.count(",") + 1:
        raise ValueError(f"`{arg}` must be {layout}, got shape {shapes[arg]}")
    if len({s[0] for s in shapes.values()}) != 1:
      raise ValueError(f"the episode axes differ: {shapes}; give every argument the same B")
  elif len(shapes[name]) != 2:
    raise ValueError(f"`{name}` must be [N, D], got shape {shapes[name]}")
  # One episode's view of the arguments, for the per-episode checks.
  episode = lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[int(batched):], jnp.result_type(x))
  prototypes.check_episode(episode(support), episode(support_labels))
  if shapes["support"][-1] != shapes[name][-1]:
    raise ValueError(
        f"`support` has feature dim D = {shapes['support'][-1]} but `{name}` has "
        f"D = {shapes[name][-1]}; they must match")
  prototypes.check_labels(support_labels, shapes[name][-2])


def _check_trajectory_every(every, num_steps):
  if every is None:
    return
  if not isinstance(every, int) or every < 1 or num_steps % every:
    raise ValueError(
        f"trajectory_every must be a positive int dividing T = {num_steps}, got {every!r}")
