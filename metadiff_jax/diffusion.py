"""The diffusion over a head's weights: forward noising, the training loss, the sampler.

- Training (Algorithm 1, Eq. 12): w_t = sqrt(abar_t) w0 + sqrt(1 - abar_t) eps with
  t ~ U{0..T-1} and eps ~ N(0, I) per episode; the loss is the mean of (eps_theta - eps)^2 over
  all entries of the batch.
- Inference (Algorithm 2, Eq. 8 as the original code runs it): starting from w_T ~ N(0, I),
  w_{t-1} = (w_t - beta_t / sqrt(1 - abar_t) * eps_theta(w_t, S, t)) / sqrt(alpha_t)
  for t = T-1, ..., 0, with no noise term. The whole loop is one `lax.scan` over all episodes
  at once. Before it, what the support-loss gradient needs of the support set
  (`tcunet.condition`: the class sums and counts for Eq. 11) is computed once per episode,
  and the network's time features (embedding, gate, block factors) once per step for all
  steps; each step is then the support-loss gradient and one matmul per block over all
  episodes' rows.
- Respaced inference (Nichol & Dhariwal 2021, Section 4): the sampler takes any schedule, so a
  K-step schedule from `schedule.respace` runs K steps; at step i it tells the network the
  training step `sched.timesteps[i]` and updates with the respaced coefficients at i.

The model is any Flax module with TCUNet's interface: `__call__(w_t, t, support, labels)` for
training, and `time_features(t)`, `support_gradient(w_t, cond)` and
`from_gradient_and_time(grad, time_features, grad_in)` for the sampler, where `cond` is
`tcunet.condition(model.head, model.gradient, support, labels, N)`; a module without `head`
and `gradient` attributes is taken to be the default variant ("prototype", "l2"). The weights
are [N, W]: W = D for the prototype head, D + 1 (the bias) for the linear head. Functions
named `*_batch` and `loss*` take a leading episode axis B; `sample` works on one episode.
"""

from __future__ import annotations

import collections
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from metadiff_jax import prototypes, tcunet
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
    w0: [B, N, W] target weights (W = D, or D + 1 for the linear head).
    support: [B, S, D] support features.
    support_labels: [B, S] ints in [0, N).
    t: [B] int steps in [0, T).
    noise: [B, N, D] the noise added to `w0`.

  Returns:
    The mean over all B * N * D entries of (eps_theta(w_t, S, t) - noise)^2.
  """
  _check_args(w0, support, support_labels, "w0", batched=True, head=_head(model))
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
           trajectory_every: Optional[int] = None, dtype=None, precision=None):
  """Denoises one episode's weights from the schedule's last step down to step 0.

  Args:
    model: the denoiser module.
    variables: its variables.
    sched: the sampler's schedule, the training schedule or a respaced one
      (`schedule.respace`, `schedule.for_sampling`); K = sched.num_steps steps.
    w_T: [N, W] starting weights, N(0, I) in MetaDiff (W = D, or D + 1 for the linear head).
    support: [S, D] support features.
    support_labels: [S] ints in [0, N).
    trajectory_every: if set to k (dividing K), also return the weights every k steps.
    dtype: computation dtype of the network's layers (e.g. jnp.bfloat16); None keeps the
      model's. The carried weights, the support-loss gradient and the update stay float32.
    precision: matmul precision of the network's layers, a `jax.lax.Precision` or its name
      ("default", "high", "highest"); None keeps the model's.

  Returns:
    w0: [N, D]; with `trajectory_every=k` the pair (w0, trajectory), where trajectory is
    [K // k + 1, N, D] and entry j holds the weights after j * k reverse steps (entry 0 is
    w_T, the last is w0).
  """
  _check_args(w_T, support, support_labels, "w_T", batched=False, head=_head(model))
  _check_trajectory_every(trajectory_every, sched.num_steps)
  return _sample_jit(model, variables, sched, w_T, support, support_labels, trajectory_every,
                     _canonical_dtype(dtype), _canonical_precision(precision))


def sample_batch(model, variables, sched: Schedule, w_T, support, support_labels, *,
                 trajectory_every: Optional[int] = None, dtype=None, precision=None):
  """`sample` over a leading episode axis, in one compiled call.

  Compiled once per input shape, number of steps K, `dtype`, `precision` and
  `trajectory_every`; new values (weights, episodes, schedule coefficients) reuse it.

  Args:
    w_T: [B, N, D]; support: [B, S, D]; support_labels: [B, S]; the rest as in `sample`.

  Returns:
    w0: [B, N, D], or (w0, trajectory [B, K // k + 1, N, D]) with `trajectory_every=k`.
  """
  _check_args(w_T, support, support_labels, "w_T", batched=True, head=_head(model))
  _check_trajectory_every(trajectory_every, sched.num_steps)
  return _sample_batch_jit(
      model, variables, sched, w_T, support, support_labels, trajectory_every,
      _canonical_dtype(dtype), _canonical_precision(precision))


PRECISIONS = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
              "highest": jax.lax.Precision.HIGHEST}


def _sample_episodes(model, variables, sched, w_T, support, support_labels, trajectory_every,
                     dtype, precision):
  """The reverse process of B episodes, w_T [B, N, D]; traced, never called on host arrays.

  Everything that depends on the step alone (time embedding, gate, the five block factors) is
  computed for all K steps before the scan, and so is what the support-loss gradient needs of
  each episode (`tcunet.condition`: the class sums and counts for Eq. 11); each scan step is
  then the support-loss gradient, five matmuls over all B * N rows and the update.
  """
  if dtype is not None or precision is not None:
    model = model.clone(**{k: v for k, v in (("dtype", dtype), ("precision", precision))
                           if v is not None})
  if dtype is not None:
    # The layers would cast their parameters at every step; cast them once instead.
    variables = jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)
  num_classes = w_T.shape[-2]
  head, grad_kind = _head(model), getattr(model, "gradient", "l2")
  cond = jax.vmap(lambda s, y: tcunet.condition(head, grad_kind, s, y, num_classes))(
      support, support_labels)
  # Sampling steps i = K-1, ..., 0 in the order the scan visits them. The network is told the
  # training schedule's step timesteps[i]; the update uses the sampler's coefficients at i.
  order = jnp.arange(sched.num_steps - 1, -1, -1)
  time = model.apply(variables, sched.timesteps[order], method="time_features")
  xs = (time, sched.remove_noise_coeff[order], sched.reciprocal_sqrt_alphas[order])
  # The carried weights stay at least float32 whatever the network computes in.
  w_T = w_T.astype(jnp.promote_types(w_T.dtype, jnp.float32))
  gradient = lambda w: model.apply(variables, w, cond, method="support_gradient")
  # What the first layer computes on: the gradient cast to the layers' dtype.
  layer_input = lambda grad: grad if model.dtype is None else grad.astype(model.dtype)

  # The carry holds, beside w, the next step's first-layer input, computed in the same pass
  # over w and the class sums as the update: on an accelerator the step is memory-bound, and
  # this saves reading both once more per step (about 20% more episodes/s on an H100 at
  # B = 8192-65536, fp32 and bf16). The float32 gradient for the gate and the skip connection
  # is recomputed from w in that pass, so the numbers are those of `denoise_from_time`.
  def step(carry, x):
    w, grad_in = carry
    time_i, coeff, recip = x
    eps = model.apply(variables, gradient(w), time_i, grad_in, method="from_gradient_and_time")
    # Eq. 8 as the original code runs it, `reverse_step` with the coefficients gathered.
    w = (w - coeff * eps.astype(w.dtype)) * recip
    return (w, layer_input(gradient(w))), None

  carry = (w_T, layer_input(gradient(w_T)))
  if trajectory_every is None:
    (w0, _), _ = jax.lax.scan(step, carry, xs)
    return w0

  def chunk(carry, chunk_xs):
    carry, _ = jax.lax.scan(step, carry, chunk_xs)
    return carry, carry[0]

  chunks = jax.tree_util.tree_map(
      lambda a: a.reshape(-1, trajectory_every, *a.shape[1:]), xs)
  (w0, _), trajectory = jax.lax.scan(chunk, carry, chunks)  # trajectory: [K // k, B, N, D]
  trajectory = jnp.concatenate([w_T[None], trajectory], axis=0)
  return w0, jnp.moveaxis(trajectory, 0, 1)


_STATIC = ("model", "trajectory_every", "dtype", "precision")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_jit(model, variables, sched, w_T, support, support_labels, trajectory_every, dtype,
                precision):
  TRACE_COUNTS["sample"] += 1
  # One episode is a batch of one: the same program as `sample_batch`.
  out = _sample_episodes(model, variables, sched, w_T[None], support[None],
                         support_labels[None], trajectory_every, dtype, precision)
  return jax.tree_util.tree_map(lambda x: x[0], out)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_batch_jit(model, variables, sched, w_T, support, support_labels, trajectory_every,
                      dtype, precision):
  TRACE_COUNTS["sample_batch"] += 1
  return _sample_episodes(model, variables, sched, w_T, support, support_labels,
                          trajectory_every, dtype, precision)


def _canonical_dtype(dtype):
  """None or a floating numpy dtype, so that equal settings hit the same compiled sampler."""
  if dtype is None:
    return None
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype such as jnp.bfloat16, got {dtype}")
  return dtype


def _canonical_precision(precision):
  """None or a `jax.lax.Precision`, from itself or its name."""
  if precision is None or isinstance(precision, jax.lax.Precision):
    return precision
  if isinstance(precision, str) and precision.lower() in PRECISIONS:
    return PRECISIONS[precision.lower()]
  raise ValueError(
      f"precision must be a jax.lax.Precision or one of {sorted(PRECISIONS)}, "
      f"got {precision!r}")


def _head(model) -> str:
  """The model's head; a module with the old interface has none and is a prototype denoiser."""
  return getattr(model, "head", "prototype")


def _check_args(w, support, support_labels, name, batched, head="prototype"):
  """Ranks, episode counts, feature dims and label dtype at trace time; label values on host.

  Label values are checked only where they are concrete; under a trace `tcunet.condition`
  turns out-of-range labels into NaN instead. The linear head's weights are one column (the
  bias) wider than the support features.
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
  bias = int(head == "linear")
  if shapes["support"][-1] + bias != shapes[name][-1]:
    if bias:
      raise ValueError(
          f"`support` has feature dim D = {shapes['support'][-1]} but the linear head's "
          f"`{name}` has rows of {shapes[name][-1]}; they must be D + 1 (the bias last)")
    raise ValueError(
        f"`support` has feature dim D = {shapes['support'][-1]} but `{name}` has "
        f"D = {shapes[name][-1]}; they must match")
  prototypes.check_labels(support_labels, shapes[name][-2])


def _check_trajectory_every(every, num_steps):
  if every is None:
    return
  if not isinstance(every, int) or every < 1 or num_steps % every:
    raise ValueError(
        f"trajectory_every must be a positive int dividing the schedule's {num_steps} steps, "
        f"got {every!r}")
