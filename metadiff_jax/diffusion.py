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
- Other samplers and targets (docs/STABILITY.md), each a switch beside the original:
  `sampler="ddpm"` adds DDPM's noise to the same update, sigma_t z with sigma_t^2 = beta_t
  (Ho et al. 2020, Algorithm 2; none at the last step); `sampler="ddim"` takes DDIM's
  deterministic step (Song et al. 2021, Eq. 12 with eta = 0),
  w_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps_theta, with
  x0_hat = (w_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t) and abar_{-1} = 1. A model with
  `prediction = "x0"` outputs w_0 itself: training regresses it (the mean of (x0_theta - w0)^2)
  and every sampler uses the noise it implies, eps = (w_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).

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
from metadiff_jax.errors import ConfigError
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
    The mean over all B * N * D entries of (eps_theta(w_t, S, t) - noise)^2; for a model that
    predicts x0 (`prediction = "x0"`), of (x0_theta(w_t, S, t) - w0)^2.
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
  out = jax.vmap(model.apply, in_axes=(None, 0, 0, 0, 0))(
      variables, w_t, t, support, support_labels)
  return jnp.mean(jnp.square(out - (w0 if _prediction(model) == "x0" else noise)))


def noise_error(model, variables, sched: Schedule, w0, support, support_labels, t, noise):
  """Per-episode mean squared error of the predicted noise, [B]: a diagnostic.

  As `loss_from_noise`, but one number per episode and always in noise space, so that models
  that predict x0 compare with those that predict eps: an x0 prediction is turned into the
  noise it implies. Predicting zero noise scores the mean of noise^2 (about 1).
  """
  _check_args(w0, support, support_labels, "w0", batched=True, head=_head(model))
  w_t = q_sample(sched, w0, t, noise)
  out = jax.vmap(model.apply, in_axes=(None, 0, 0, 0, 0))(
      variables, w_t, t, support, support_labels)
  eps = implied_noise(sched, _prediction(model), out, w_t, t)
  return jnp.mean(jnp.square(eps - noise), axis=(-2, -1))


def implied_noise(sched: Schedule, prediction: str, out, w_t, t):
  """The noise a model's output `out` [..., N, W] stands for at steps t [...]."""
  if prediction == "eps":
    return out
  scale = sched.sqrt_alphas_cumprod[t][..., None, None]
  sigma = sched.sqrt_one_minus_alphas_cumprod[t][..., None, None]
  return (w_t - scale * out) / sigma


def loss(model, variables, sched: Schedule, w0, support, support_labels, key):
  """Eq. 12 with t ~ U{0..T-1} and eps ~ N(0, I) drawn per episode from `key`.

  Shapes as in `loss_from_noise`; differentiate it with respect to `variables`.
  """
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, jnp.shape(w0)[:1], 0, sched.num_steps)
  noise = jax.random.normal(noise_key, jnp.shape(w0), jnp.result_type(w0))
  return loss_from_noise(model, variables, sched, w0, support, support_labels, t, noise)


SAMPLERS = ("original", "ddpm", "ddim")


def check_config(diffusion) -> None:
  """Raises a ConfigError where a config's `diffusion` section names an unknown sampler or
  rescales the features to a root-mean-square that is not positive."""
  if diffusion.sampler not in SAMPLERS:
    raise ConfigError(f"config.diffusion.sampler must be one of {', '.join(SAMPLERS)}, got "
                      f"{diffusion.sampler!r}")
  if diffusion.feature_rms is not None and not diffusion.feature_rms > 0:
    raise ConfigError(f"config.diffusion.feature_rms must be > 0 or None, got "
                      f"{diffusion.feature_rms!r}")


def sample(model, variables, sched: Schedule, w_T, support, support_labels, *,
           trajectory_every: Optional[int] = None, dtype=None, precision=None,
           sampler: str = "original", noise_key=None):
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
    sampler: "original" (the deterministic update above), "ddpm" (the same update plus
      sigma_t z, sigma_t^2 = beta_t) or "ddim" (eta = 0).
    noise_key: the key of the "ddpm" sampler's noise (z of step i is normal(fold_in(key, i)));
      unused by the others.

  Returns:
    w0: [N, D]; with `trajectory_every=k` the pair (w0, trajectory), where trajectory is
    [K // k + 1, N, D] and entry j holds the weights after j * k reverse steps (entry 0 is
    w_T, the last is w0).
  """
  _check_args(w_T, support, support_labels, "w_T", batched=False, head=_head(model))
  _check_trajectory_every(trajectory_every, sched.num_steps)
  keys = _check_sampler(sampler, noise_key, ())
  return _sample_jit(model, variables, sched, w_T, support, support_labels,
                     None if keys is None else keys[None], trajectory_every,
                     _canonical_dtype(dtype), _canonical_precision(precision), sampler)


def sample_batch(model, variables, sched: Schedule, w_T, support, support_labels, *,
                 trajectory_every: Optional[int] = None, dtype=None, precision=None,
                 sampler: str = "original", noise_keys=None):
  """`sample` over a leading episode axis, in one compiled call.

  Compiled once per input shape, number of steps K, `dtype`, `precision`, `sampler` and
  `trajectory_every`; new values (weights, episodes, schedule coefficients) reuse it.

  Args:
    w_T: [B, N, D]; support: [B, S, D]; support_labels: [B, S]; the rest as in `sample`.
    noise_keys: [B] keys, one per episode, for the "ddpm" sampler's noise.

  Returns:
    w0: [B, N, D], or (w0, trajectory [B, K // k + 1, N, D]) with `trajectory_every=k`.
  """
  _check_args(w_T, support, support_labels, "w_T", batched=True, head=_head(model))
  _check_trajectory_every(trajectory_every, sched.num_steps)
  keys = _check_sampler(sampler, noise_keys, jnp.shape(w_T)[:1])
  return _sample_batch_jit(
      model, variables, sched, w_T, support, support_labels, keys, trajectory_every,
      _canonical_dtype(dtype), _canonical_precision(precision), sampler)


def update_coefficients(sched: Schedule, sampler: str = "original", prediction: str = "eps"):
  """The reverse step as w_{i-1} = a_i w_i + b_i out_i + s_i z, for each step i of `sched`.

  `out` is the network's output (noise, or x0 where `prediction = "x0"`) and z ~ N(0, I).

  Args:
    sched: the sampler's schedule (K steps).
    sampler: "original", "ddpm" or "ddim" (see the module docstring).
    prediction: "eps", or one whose output is x0 (`tcunet.X0_PREDICTIONS`).

  Returns:
    (a, b, s), each [K] float32; s is zero but for "ddpm" (and at i = 0 there too).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
  if sampler == "ddim":
    # sqrt(abar_{i-1}) and sqrt(1 - abar_{i-1}), with abar_{-1} = 1.
    prev_scale = jnp.concatenate([jnp.ones(1), sched.sqrt_alphas_cumprod[:-1]])
    prev_sigma = jnp.concatenate([jnp.zeros(1), sched.sqrt_one_minus_alphas_cumprod[:-1]])
    a = prev_scale / sched.sqrt_alphas_cumprod
    b = prev_sigma - a * sched.sqrt_one_minus_alphas_cumprod
  else:
    a = sched.reciprocal_sqrt_alphas
    b = -sched.reciprocal_sqrt_alphas * sched.remove_noise_coeff
  if prediction in tcunet.X0_PREDICTIONS:  # out = x0: eps = (w - sqrt(abar) x0) / sqrt(1 - abar)
    a, b = (a + b / sched.sqrt_one_minus_alphas_cumprod,
            -b * sched.sqrt_alphas_cumprod / sched.sqrt_one_minus_alphas_cumprod)
  s = sched.sigmas.at[0].set(0.0) if sampler == "ddpm" else jnp.zeros_like(a)
  return a, b, s


PRECISIONS = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
              "highest": jax.lax.Precision.HIGHEST}


def _sample_episodes(model, variables, sched, w_T, support, support_labels, noise_keys,
                     trajectory_every, dtype, precision, sampler="original"):
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
  # The original's update keeps its own expression; the others are a w + b out + s z.
  original = sampler == "original" and _prediction(model) == "eps"
  if original:
    xs = (time, sched.remove_noise_coeff[order], sched.reciprocal_sqrt_alphas[order])
  else:
    a, b, s = update_coefficients(sched, sampler, _prediction(model))
    xs = (time, a[order], b[order], s[order], order)
  # The carried weights stay at least float32 whatever the network computes in.
  w_T = w_T.astype(jnp.promote_types(w_T.dtype, jnp.float32))
  gradient = lambda w: model.apply(variables, w, cond, method="support_gradient")
  # What the first layer computes on: the gradient (and w, the support means where the model
  # reads them) cast to the layers' dtype.
  if getattr(model, "inputs", ("gradient",)) == ("gradient",):
    layer_input = lambda w, grad: grad if model.dtype is None else grad.astype(model.dtype)
  else:
    layer_input = lambda w, grad: model.apply(variables, w, grad, cond, method="network_input")

  def noise(i, like):
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), like.shape[1:]))
    return z(noise_keys).astype(like.dtype)

  # The carry holds, beside w, the next step's first-layer input, computed in the same pass
  # over w and the class sums as the update: on an accelerator the step is memory-bound, and
  # this saves reading both once more per step (about 20% more episodes/s on an H100 at
  # B = 8192-65536, fp32 and bf16). The float32 gradient for the gate and the skip connection
  # is recomputed from w in that pass, so the numbers are those of `denoise_from_time`.
  residual = getattr(model, "prediction", "eps") in tcunet.RESIDUAL_PREDICTIONS
  if residual:  # x0 = prior + (out - g): the prior is constant along the loop
    means = model.apply(variables, cond, num_classes, jnp.ndim(w_T), method="prior")

  def step(carry, x):
    w, grad_in = carry
    grad = gradient(w)
    out = model.apply(variables, grad, x[0], grad_in, method="from_gradient_and_time")
    if residual:
      out = model.apply(variables, out, grad, means, method="residual_output")
    if original:
      _, coeff, recip = x
      # Eq. 8 as the original code runs it, `reverse_step` with the coefficients gathered.
      w = (w - coeff * out.astype(w.dtype)) * recip
    else:
      _, a_i, b_i, s_i, i = x
      w = a_i * w + b_i * out.astype(w.dtype)
      if sampler == "ddpm":
        w = w + s_i * noise(i, w)
    return (w, layer_input(w, gradient(w))), None

  carry = (w_T, layer_input(w_T, gradient(w_T)))
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


_STATIC = ("model", "trajectory_every", "dtype", "precision", "sampler")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_jit(model, variables, sched, w_T, support, support_labels, noise_keys,
                trajectory_every, dtype, precision, sampler):
  TRACE_COUNTS["sample"] += 1
  # One episode is a batch of one: the same program as `sample_batch`.
  out = _sample_episodes(model, variables, sched, w_T[None], support[None],
                         support_labels[None], noise_keys, trajectory_every, dtype, precision,
                         sampler)
  return jax.tree_util.tree_map(lambda x: x[0], out)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_batch_jit(model, variables, sched, w_T, support, support_labels, noise_keys,
                      trajectory_every, dtype, precision, sampler):
  TRACE_COUNTS["sample_batch"] += 1
  return _sample_episodes(model, variables, sched, w_T, support, support_labels, noise_keys,
                          trajectory_every, dtype, precision, sampler)


def _check_sampler(sampler, keys, shape):
  """The "ddpm" sampler's keys (typed, of `shape`), or None for the deterministic ones."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
  if sampler != "ddpm":
    return None
  if keys is None:
    raise ValueError("the ddpm sampler draws noise at every step: pass its key "
                     "(noise_key=, or noise_keys= [B] keys for sample_batch)")
  if not jnp.issubdtype(jnp.result_type(keys), jax.dtypes.prng_key):
    keys = jax.random.wrap_key_data(keys)
  if jnp.shape(keys) != tuple(shape):
    raise ValueError(f"the ddpm sampler needs one key per episode, shape {tuple(shape)}; "
                     f"got {jnp.shape(keys)}")
  return keys


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


def _prediction(model) -> str:
  """What the model's output is, "eps" or "x0" (the original interface: eps; "x0_residual"
  outputs x0 too)."""
  prediction = getattr(model, "prediction", "eps")
  return "x0" if prediction in tcunet.X0_PREDICTIONS else prediction


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
