"""The task-conditional UNet (TCUNet), MetaDiff's noise predictor eps_theta(w_t, S, t).

Section 4.3 and Figure 3 of the paper; the layer-by-layer computation below is the original
code's, as spelled out in the project's reference notes:

1. e(t) = [cos(t * f), sin(t * f)], f_j = 10000^(-j / (E/2)), j = 0..E/2-1 (E = 320).
2. A scalar gate s = sigmoid(time_scale_2(relu(time_scale_0(e)))).
3. g = dL/dw_t of the support loss (Eq. 11), the "initial noise estimate".
4. Five blocks (two encoder, a bottleneck, two decoder), each a linear map of the previous
   output multiplied elementwise by a linear map of e(t):
     x1 = softplus(P1(g) * E1),  x2 = softplus(P2(x1) * E2),
     x3 = softplus(P3(x2) * E3) + x2,  x4 = softplus(P4(x3) * E4) + x1,
     x5 = P5(x4) * E5 + g            (no activation on the last block).
5. eps = s * g + (1 - s) * x5.

Steps 1, 2 and the E_b = time_embB(e) of step 4 depend on t alone: `time_features` computes
them, for one step or a vector of steps, and `from_gradient_and_time` does the rest, so a
sampler can compute them for all its steps at once, before its loop (`diffusion.sample_batch`).

Widths: D -> h1 -> h2 -> h2 -> h1 -> D with (h1, h2) = (D/2, D/4) by default. Parameters map
one-to-one onto the original's PyTorch names: `time_scale.0` -> `time_scale_0`,
`time_scale.2` -> `time_scale_2`, `time_embB` -> `time_embB`, `proto_infB` -> `proto_infB`
(B = 1..5), each a Dense with kernel = weight.T (see `pytorch_weights`).

Variants (the paper's Tables 3 and 4), chosen by the module's attributes; the default is the
network above, unchanged:

- `head`: the base learner whose weights w are diffused (`heads`): "prototype" (w [N, D]) or
  "linear" (w [N, D + 1], bias last; Table 4). `feature_dim` is the width of w's rows, so the
  support features of the linear head have `feature_dim - 1` columns.
- `gradient`: what step 3 feeds the network for the prototype head: "l2", Eq. 11's gradient,
  or "cosine_ce" (Table 3 ii, "replacing L2 loss"), the gradient of the support set's
  cross-entropy under the query classifier's own 10 x cosine logits. The linear head is always
  fed the gradient of its own cross-entropy support loss.
- `unet`: False (Table 3 iii, "w/o UNet") drops steps 1, 2, 4 and 5: eps = g, and the module
  has no parameters.

Stabilised variants (docs/STABILITY.md), also attributes; the defaults are the original's:

- `inputs`: what the first block P1 reads. ("gradient",) is the original: P1(g). Adding
  "weights" feeds it [g, w_t], adding "means" [g, ..., m_hat] (the support class means;
  prototype head only), concatenated along the feature axis, so P1 is [k W, h1] for k inputs.
  The gate and the skip connection of step 5 still use g alone. The original sees w_t only
  through g = 2K (w_t - m_hat) (Eq. 11, "sum"), so it cannot tell m_hat itself, while the noise
  it must predict, eps = (w_t - sqrt(abar_t) w_0) / sqrt(1 - abar_t), depends on it.
- `prediction`: what the network's output means. "eps" (Eq. 12): the noise. "x0": the clean
  weights w_0; training regresses w_0 and the sampler turns the output into the noise it
  implies, eps = (w_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (`diffusion`). "x0_residual"
  (prototype head only): x0 too, read as the support class means plus what the network adds
  to the skip connection, x0 = m_hat + (out - g) = m_hat + (1 - s) x5' with x5' = P5(x4) E5,
  so the support means are the prior and the layers learn a correction to them. The network
  is the same in all three.

`condition` computes, once per episode, what the gradient needs of the support set; the
sampler hands it to `support_gradient` at every step.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metadiff_jax import heads, prototypes
from metadiff_jax.errors import ConfigError

GRADIENTS = ("l2", "cosine_ce")
INPUTS = ("gradient", "weights", "means")
PREDICTIONS = ("eps", "x0", "x0_residual", "x0_linear_prior")
# The predictions whose output is the clean weights w_0 (the sampler and the loss read it so),
# and those that add the network's output to a prior built from the support class means.
X0_PREDICTIONS = ("x0", "x0_residual", "x0_linear_prior")
RESIDUAL_PREDICTIONS = ("x0_residual", "x0_linear_prior")


def _torch_linear_bias_init(fan_in: int):
  """PyTorch's nn.Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# PyTorch's nn.Linear weight init (kaiming_uniform with a = sqrt(5)) is U(+-1/sqrt(fan_in)),
# which is variance scaling 1/3 in fan-in mode; keeping it keeps the original's training
# dynamics.
_torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def sinusoidal_time_embedding(t, dim: int = 320) -> jnp.ndarray:
  """[..., dim] embedding of steps t [...], cosines first: [cos(t f), sin(t f)]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(t, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def check_variant(head: str, gradient: str, inputs=("gradient",), prediction="eps") -> None:
  """Raises ValueError for an unknown head, gradient, inputs or prediction, or a combination
  that cannot work."""
  heads.check_head(head)
  if gradient not in GRADIENTS:
    raise ValueError(f"unknown gradient {gradient!r}: use one of {GRADIENTS}")
  if head == "linear" and gradient != "l2":
    raise ValueError(f"gradient {gradient!r} is a prototype-head variant; the linear head is "
                     "always fed its own cross-entropy gradient: use gradient='l2'")
  inputs = tuple(inputs)
  if (not inputs or inputs[0] != "gradient" or len(set(inputs)) != len(inputs)
      or any(i not in INPUTS for i in inputs)):
    raise ValueError(f"inputs must start with 'gradient' and may add 'weights' and/or 'means' "
                     f"(each once), got {inputs!r}")
  if "means" in inputs and head != "prototype":
    raise ValueError("the 'means' input (the support class means) is a prototype-head input; "
                     "the linear head can add 'weights' only")
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")
  if prediction in RESIDUAL_PREDICTIONS and head != "prototype":
    raise ValueError(f"prediction {prediction!r} adds the network's correction to the support "
                     "class means, prototype-head weights: use 'eps' or 'x0' with the linear head")


def check_config(denoiser) -> None:
  """Checks a config's `denoiser` section: its gradient, UNet switch, inputs and prediction
  (`check_variant`), with the head that `heads.check_config` checks.

  Raises:
    ConfigError: a value the TCUNet does not know, or a combination that cannot work.
  """
  d = denoiser
  if d.gradient not in GRADIENTS:
    raise ConfigError(f"config.denoiser.gradient must be one of {', '.join(GRADIENTS)}, got "
                      f"{d.gradient!r}")
  if d.head == "linear" and d.gradient != "l2":
    raise ConfigError(f"config.denoiser.gradient = {d.gradient!r} is a prototype-head variant; "
                      "the linear head is fed its own cross-entropy gradient: set it to 'l2'")
  if not isinstance(d.unet, bool):
    raise ConfigError(f"config.denoiser.unet must be True or False, got {d.unet!r}")
  try:
    check_variant(d.head, d.gradient, tuple(d.inputs), d.prediction)
  except ValueError as e:
    raise ConfigError(f"config.denoiser: {e}") from None
  if not d.unet and d.prediction != "eps":
    raise ConfigError("config.denoiser.unet = False makes eps the gradient, a noise estimate: "
                      "set config.denoiser.prediction = 'eps'")


def support_means(head: str, gradient: str, cond, num_classes: int):
  """[N, D] support class means m_hat of one episode from its `condition`."""
  if head == "prototype" and gradient == "l2":
    return cond.sums / jnp.maximum(cond.counts, 1.0)[..., None]
  support, labels = cond
  return prototypes.class_means(support, labels, num_classes)


def condition(head: str, gradient: str, support, labels, num_classes: int):
  """What the support-loss gradient of one episode needs of its support set.

  Computed once per episode, before the reverse loop; `support_gradient` takes it.

  Args:
    head, gradient: the variant (see `TCUNet`).
    support: [S, D] support features.
    labels: [S] ints in [0, N).
    num_classes: N.

  Returns:
    For ("prototype", "l2"): `prototypes.SupportStats`, the class sums [N, D] and counts [N]
    that Eq. 11's closed-form gradient needs. For the cross-entropy gradients:
    (support [S, D], labels [S]) as they are. Either is NaN where a label lies outside
    [0, N) (the values are unknown under a trace), so such an episode cannot pass silently.
  """
  check_variant(head, gradient)
  if head == "prototype" and gradient == "l2":
    return prototypes.support_stats(support, labels, num_classes)
  prototypes.check_episode(support, labels)
  # An out-of-range label makes the cross-entropy NaN but its gradient merely drops the
  # example, a finite wrong answer; poisoned features make the gradient NaN too.
  in_range = jnp.all((labels >= 0) & (labels < num_classes))
  return support + jnp.where(in_range, 0.0, jnp.nan).astype(support.dtype), labels


def episode_gradient(head: str, gradient: str, w, cond, reduction: str = "sum"):
  """d(support loss)/dw of one episode's weights w [N, W] from its `condition`: [N, W]."""
  if head == "prototype" and gradient == "l2":
    return prototypes.support_loss_grad_from_stats(w, cond, reduction)
  support, labels = cond
  if head == "prototype":
    return heads.cosine_ce_grad(w, support, labels, reduction)
  return heads.support_grad(head, w, support, labels, reduction)


class TimeFeatures(NamedTuple):
  """What the TCUNet computes from the step t alone, for steps t of shape [...].

  Attributes:
    gate: [..., 1], s = sigmoid(time_scale_2(relu(time_scale_0(e(t))))).
    scales: (E1, ..., E5), E_b = time_embB(e(t)) of shape [..., h_b], the factors of the five
      blocks, (h_1..h_5) = `TCUNet.widths`.
  """

  gate: jnp.ndarray
  scales: tuple


class TCUNet(nn.Module):
  """eps_theta(w_t, S, t) for one episode.

  Attributes:
    feature_dim: the width of the weight rows: D, that of the features, for the prototype
      head; D + 1 for the linear head.
    hidden_dims: (h1, h2), the encoder widths; None gives (feature_dim // 2, feature_dim // 4).
    time_embed_dim: E, the width of the sinusoidal time embedding (even).
    loss_reduction: "sum" (the original code) or "mean" (Eq. 11 as printed) for the support
      loss whose gradient feeds the network.
    dtype: computation dtype of the dense layers (None: that of the inputs).
    precision: matmul precision of the dense layers (a `jax.lax.Precision` or None).
    head: "prototype" or "linear", the base learner whose weights are denoised.
    gradient: "l2" (Eq. 11) or "cosine_ce" (Table 3 ii; prototype head only), the support
      loss whose gradient feeds the network.
    unet: False gives eps = the gradient (Table 3 iii), with no parameters.
    inputs: what the first block reads: ("gradient",) (the original), or with "weights" (w_t)
      and/or "means" (the support class means) added, concatenated in that order.
    prediction: "eps" (the original) or "x0", what the output is trained to be.
  """

  feature_dim: int = 512
  hidden_dims: Optional[Sequence[int]] = None
  time_embed_dim: int = 320
  loss_reduction: str = "sum"
  dtype: Any = None
  precision: Any = None
  head: str = "prototype"
  gradient: str = "l2"
  unet: bool = True
  inputs: Sequence[str] = ("gradient",)
  prediction: str = "eps"

  def __post_init__(self):
    # A tuple keeps the module hashable, as `jax.jit` needs of a static argument; configs and
    # command lines may hand over a list.
    if self.hidden_dims is not None:
      if len(self.hidden_dims) != 2:
        raise ValueError(f"hidden_dims must be two widths (h1, h2), got {self.hidden_dims!r}")
      object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
    object.__setattr__(self, "inputs", tuple(self.inputs))
    check_variant(self.head, self.gradient, self.inputs, self.prediction)
    if not self.unet and self.prediction != "eps":
      raise ValueError("without the UNet eps is the gradient: it predicts eps, not x0; keep "
                       "prediction='eps' (it has no layers to read other inputs either)")
    super().__post_init__()

  def setup(self):
    if self.time_embed_dim % 2:
      raise ValueError(f"time_embed_dim must be even, got {self.time_embed_dim}")
    if self.loss_reduction not in prototypes.REDUCTIONS:
      raise ValueError(
          f"unknown loss_reduction {self.loss_reduction!r}: use one of {prototypes.REDUCTIONS}")
    if not self.unet:  # eps = g: no layers
      return
    d, e = self.feature_dim, self.time_embed_dim
    h1, h2 = self.widths[:2]
    dense = self._dense
    self.time_scale_0 = dense(e // 2, e)
    self.time_scale_2 = dense(1, e // 2)
    # Encoder, bottleneck, decoder: D -> h1 -> h2 -> h2 -> h1 -> D.
    self.proto_inf1, self.time_emb1 = dense(h1, d * len(self.inputs)), dense(h1, e)
    self.proto_inf2, self.time_emb2 = dense(h2, h1), dense(h2, e)
    self.proto_inf3, self.time_emb3 = dense(h2, h2), dense(h2, e)
    self.proto_inf4, self.time_emb4 = dense(h1, h2), dense(h1, e)
    self.proto_inf5, self.time_emb5 = dense(d, h1), dense(d, e)
    if self.prediction == "x0_linear_prior":
      self.prior_kernel = self.param("prior_kernel", nn.initializers.zeros, (d, d))
      self.prior_bias = self.param("prior_bias", nn.initializers.zeros, (d,))

  @property
  def widths(self):
    """Output widths of the five blocks, (h1, h2, h2, h1, D)."""
    h1, h2 = self.hidden_dims or (self.feature_dim // 2, self.feature_dim // 4)
    return (h1, h2, h2, h1, self.feature_dim)

  def _dense(self, features: int, fan_in: int) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=self.dtype,
        precision=self.precision,
        kernel_init=_torch_linear_kernel_init,
        bias_init=_torch_linear_bias_init(fan_in))

  def __call__(self, w_t, t, support, support_labels):
    """Predicts the noise in `w_t`.

    Args:
      w_t: [N, W] noisy weights at step t, W = feature_dim (D, or D + 1 for the linear head).
      t: int scalar, the 0-based diffusion step.
      support: [S, D] support features.
      support_labels: [S] ints in [0, N).

    Returns:
      eps: [N, W], the predicted noise.
    """
    self._check_weights(w_t, "w_t")
    cond = condition(self.head, self.gradient, support, support_labels,
                     w_t.shape[0])  # checks ranks
    if support.shape[-1] != self.support_dim:
      hint = (f" (the linear head's weight rows are D + 1 wide: its support features need "
              f"D = {self.support_dim})" if self.head == "linear" else "")
      raise ValueError(
          f"`support` has feature dim {support.shape[-1]}, but the TCUNet was built for "
          f"feature_dim={self.feature_dim}{hint}")
    prototypes.check_labels(support_labels, w_t.shape[0])
    return self.denoise(w_t, t, cond)

  @property
  def support_dim(self) -> int:
    """D, the width of the support features: feature_dim, less the linear head's bias."""
    return self.feature_dim - (self.head == "linear")

  def denoise(self, w_t, t, cond):
    """Same as `__call__`, from the episode's `condition` (e.g. the support set's class sums
    and counts).

    `cond` can be computed once per episode; `diffusion.sample_batch` goes further, with
    `time_features` for all steps at once, and `support_gradient` and `from_gradient_and_time`
    for all episodes at once.
    """
    self._check_weights(w_t, "w_t")
    _check_time(t)
    return self.denoise_from_time(w_t, self.time_features(t), cond)

  def from_gradient(self, grad, t):
    """eps from the support-loss gradient `grad` [N, D] and the step t (steps 1-2, 4-5);
    the original's inputs only (a variant fed more needs `denoise`)."""
    return self.from_gradient_and_time(grad, self.time_features(t))

  def network_input(self, w_t, grad, cond):
    """What the first block reads, [..., N, k W], in the layers' dtype: the gradient `grad`,
    then w_t and the support class means where `inputs` names them.

    `cond` is the episodes' `condition` with the leading axes of `w_t`.
    """
    parts = [grad]
    if "weights" in self.inputs:
      parts.append(w_t.astype(grad.dtype))
    if "means" in self.inputs:
      parts.append(self.class_means(cond, w_t.shape[-2], jnp.ndim(w_t)).astype(grad.dtype))
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return x if self.dtype is None else x.astype(self.dtype)

  def time_features(self, t) -> TimeFeatures:
    """The gate and the five block factors of steps t (steps 1, 2 and E_b of step 4).

    Args:
      t: int steps of any shape [...], e.g. a scalar or the [K] steps of a sampler; for [K]
        steps each layer is one [K, E] x [E, h] matmul.

    Returns:
      `TimeFeatures` with leading axes [...].
    """
    if not self.unet:  # no time dependence; a gate of 1 says eps = g
      return TimeFeatures(gate=jnp.ones(jnp.shape(t) + (1,), jnp.float32), scales=())
    e = sinusoidal_time_embedding(t, self.time_embed_dim)
    gate = nn.sigmoid(self.time_scale_2(nn.relu(self.time_scale_0(e))))
    layers = (self.time_emb1, self.time_emb2, self.time_emb3, self.time_emb4, self.time_emb5)
    return TimeFeatures(gate=gate, scales=tuple(layer(e) for layer in layers))

  def from_gradient_and_time(self, grad, time: TimeFeatures, grad_in=None):
    """eps from the gradient `grad` [..., N, D] and one step's `TimeFeatures` (steps 4-5).

    Each block is one matmul over all rows of `grad`, however many leading axes it has.
    `time` holds one step's features (gate [1], E_b [h_b]), shared by all rows.

    Args:
      grad: [..., N, D] support-loss gradient; the gate and the skip connection use it as is.
      time: the step's `TimeFeatures`.
      grad_in: the first block's input in the layers' dtype (`network_input`; a sampler can
        produce it together with the previous step's update); None takes `grad`, which only
        the original inputs allow.
    """
    if not self.unet:
      return grad
    if grad_in is None and self.inputs != ("gradient",):
      raise ValueError(f"a TCUNet fed {self.inputs} needs its first block's input: pass "
                       "grad_in=network_input(w_t, grad, cond), or call denoise_from_time")
    gate, (e1, e2, e3, e4, e5) = time
    x1 = nn.softplus(self.proto_inf1(grad if grad_in is None else grad_in) * e1)
    x2 = nn.softplus(self.proto_inf2(x1) * e2)
    x3 = nn.softplus(self.proto_inf3(x2) * e3) + x2
    x4 = nn.softplus(self.proto_inf4(x3) * e4) + x1
    x5 = self.proto_inf5(x4) * e5 + grad
    return gate * grad + (1.0 - gate) * x5

  def support_gradient(self, w_t, cond):
    """The support-loss gradient (step 3) of weights `w_t` [..., N, W], [..., N, W].

    `cond` is `condition(...)` of the episodes, with the leading axes of `w_t` (e.g. class
    sums [..., N, D] and counts [..., N]); the gradient is per episode, so it is vmapped over
    those axes. No parameters are involved.
    """
    if jnp.ndim(w_t) < 2 or jnp.shape(w_t)[-1] != self.feature_dim:
      raise ValueError(
          f"`w_t` must be [..., N, D] {self.head} weights with D = feature_dim = "
          f"{self.feature_dim}, got shape {jnp.shape(w_t)}")
    grad_fn = functools.partial(episode_gradient, self.head, self.gradient,
                                reduction=self.loss_reduction)
    for _ in range(jnp.ndim(w_t) - 2):
      grad_fn = jax.vmap(grad_fn)
    return grad_fn(w_t, cond)

  def denoise_from_time(self, w_t, time: TimeFeatures, cond):
    """eps for weights `w_t` [..., N, W] of many episodes at one step, given its features.

    Args:
      w_t: [..., N, W] noisy weights, leading axes over episodes.
      time: one step's `TimeFeatures` (see `from_gradient_and_time`).
      cond: the episodes' `condition`, with the leading axes of `w_t` (for the default
        variant `SupportStats`: sums [..., N, D], counts [..., N]).

    Returns:
      eps: [..., N, W]; every block is one matmul over all episodes' rows.
    """
    grad = self.support_gradient(w_t, cond)
    if self.inputs == ("gradient",):  # the original: the layers cast g themselves
      out = self.from_gradient_and_time(grad, time)
    else:
      out = self.from_gradient_and_time(grad, time, self.network_input(w_t, grad, cond))
    if self.prediction in RESIDUAL_PREDICTIONS:
      return self.residual_output(out, grad, self.prior(cond, w_t.shape[-2], jnp.ndim(w_t)))
    return out

  def class_means(self, cond, num_classes: int, ndim: int = 2):
    """[..., N, D] the support class means of episodes with `ndim - 2` leading axes, from their
    `condition`."""
    means = functools.partial(support_means, self.head, self.gradient, num_classes=num_classes)
    for _ in range(ndim - 2):
      means = jax.vmap(means)
    return means(cond)

  def prior(self, cond, num_classes: int, ndim: int = 2):
    """[..., N, D] what the residual predictions correct: the support class means m_hat
    ("x0_residual"), or m_hat + m_hat L + c with L [D, D] and c [D] learned, from zero, with
    the rest ("x0_linear_prior"; the optimiser's weight decay makes it a ridge regression of the
    targets on the support means, toward leaving them as they are)."""
    means = self.class_means(cond, num_classes, ndim)
    if self.prediction == "x0_linear_prior":
      means = means + jnp.matmul(means, self.prior_kernel, precision="highest") + self.prior_bias
    return means

  def residual_output(self, out, grad, means):
    """"x0_residual": x0 = m_hat + (out - g), the correction the layers add to the skip
    connection's g moved onto the support class means (float32 whatever the layers compute
    in)."""
    return means + (out.astype(jnp.float32) - grad.astype(jnp.float32))

  def _check_weights(self, w, name):
    if jnp.ndim(w) != 2 or jnp.shape(w)[-1] != self.feature_dim:
      raise ValueError(
          f"`{name}` must be [N, D] {self.head} weights with D = feature_dim = "
          f"{self.feature_dim}, got shape {jnp.shape(w)}")


def _check_time(t):
  if jnp.ndim(t) != 0 or not jnp.issubdtype(jnp.result_type(t), jnp.integer):
    raise TypeError(
        f"`t` must be an integer scalar step in [0, T), got {jnp.result_type(t)} of shape "
        f"{jnp.shape(t)}; pass one step per episode (vmap over episodes)")
