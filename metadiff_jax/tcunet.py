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
(B = 1..5), each a Dense with kernel = weight.T (see `torch_import`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metadiff_jax import prototypes


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
    feature_dim: D, the width of the features and prototypes.
    hidden_dims: (h1, h2), the encoder widths; None gives (D // 2, D // 4).
    time_embed_dim: E, the width of the sinusoidal time embedding (even).
    loss_reduction: "sum" (the original code) or "mean" (Eq. 11 as printed) for the support
      loss whose gradient feeds the network.
    dtype: computation dtype of the dense layers (None: that of the inputs).
    precision: matmul precision of the dense layers (a `jax.lax.Precision` or None).
  """

  feature_dim: int = 512
  hidden_dims: Optional[Sequence[int]] = None
  time_embed_dim: int = 320
  loss_reduction: str = "sum"
  dtype: Any = None
  precision: Any = None

  def __post_init__(self):
    # A tuple keeps the module hashable, as `jax.jit` needs of a static argument; configs and
    # command lines may hand over a list.
    if self.hidden_dims is not None:
      if len(self.hidden_dims) != 2:
        raise ValueError(f"hidden_dims must be two widths (h1, h2), got {self.hidden_dims!r}")
      object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
    super().__post_init__()

  def setup(self):
    if self.time_embed_dim % 2:
      raise ValueError(f"time_embed_dim must be even, got {self.time_embed_dim}")
    if self.loss_reduction not in prototypes.REDUCTIONS:
      raise ValueError(
          f"unknown loss_reduction {self.loss_reduction!r}: use one of {prototypes.REDUCTIONS}")
    d, e = self.feature_dim, self.time_embed_dim
    h1, h2 = self.widths[:2]
    dense = self._dense
    self.time_scale_0 = dense(e // 2, e)
    self.time_scale_2 = dense(1, e // 2)
    # Encoder, bottleneck, decoder: D -> h1 -> h2 -> h2 -> h1 -> D.
    self.proto_inf1, self.time_emb1 = dense(h1, d), dense(h1, e)
    self.proto_inf2, self.time_emb2 = dense(h2, h1), dense(h2, e)
    self.proto_inf3, self.time_emb3 = dense(h2, h2), dense(h2, e)
    self.proto_inf4, self.time_emb4 = dense(h1, h2), dense(h1, e)
    self.proto_inf5, self.time_emb5 = dense(d, h1), dense(d, e)

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
      w_t: [N, D] noisy prototype weights at step t.
      t: int scalar, the 0-based diffusion step.
      support: [S, D] support features.
      support_labels: [S] ints in [0, N).

    Returns:
      eps: [N, D], the predicted noise.
    """
    self._check_weights(w_t, "w_t")
    stats = prototypes.support_stats(support, support_labels, w_t.shape[0])  # checks ranks
    if support.shape[-1] != self.feature_dim:
      raise ValueError(
          f"`support` has feature dim {support.shape[-1]}, but the TCUNet was built for "
          f"feature_dim={self.feature_dim}")
    prototypes.check_labels(support_labels, w_t.shape[0])
    return self.denoise(w_t, t, stats)

  def denoise(self, w_t, t, stats: prototypes.SupportStats):
    """Same as `__call__`, from the support set's class sums and counts.

    `stats` can be computed once per episode; `diffusion.sample_batch` goes further, with
    `time_features` for all steps at once, and `support_gradient` and `from_gradient_and_time`
    for all episodes at once.
    """
    self._check_weights(w_t, "w_t")
    _check_time(t)
    grad = prototypes.support_loss_grad_from_stats(w_t, stats, self.loss_reduction)
    return self.from_gradient(grad, t)

  def from_gradient(self, grad, t):
    """eps from the support-loss gradient `grad` [N, D] and the step t (steps 1-2, 4-5)."""
    return self.from_gradient_and_time(grad, self.time_features(t))

  def time_features(self, t) -> TimeFeatures:
    """The gate and the five block factors of steps t (steps 1, 2 and E_b of step 4).

    Args:
      t: int steps of any shape [...], e.g. a scalar or the [K] steps of a sampler; for [K]
        steps each layer is one [K, E] x [E, h] matmul.

    Returns:
      `TimeFeatures` with leading axes [...].
    """
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
      grad_in: optionally `grad` already cast to the layers' dtype, for the first block (a
        sampler can produce it together with the previous step's update); None casts `grad`.
    """
    gate, (e1, e2, e3, e4, e5) = time
    x1 = nn.softplus(self.proto_inf1(grad if grad_in is None else grad_in) * e1)
    x2 = nn.softplus(self.proto_inf2(x1) * e2)
    x3 = nn.softplus(self.proto_inf3(x2) * e3) + x2
    x4 = nn.softplus(self.proto_inf4(x3) * e4) + x1
    x5 = self.proto_inf5(x4) * e5 + grad
    return gate * grad + (1.0 - gate) * x5

  def support_gradient(self, w_t, stats: prototypes.SupportStats):
    """The support-loss gradient (step 3) of weights `w_t` [..., N, D], [..., N, D].

    `stats` has the leading axes of `w_t` (sums [..., N, D], counts [..., N]); the gradient is
    per episode, so it is vmapped over those axes. No parameters are involved.
    """
    if jnp.ndim(w_t) < 2 or jnp.shape(w_t)[-1] != self.feature_dim:
      raise ValueError(
          f"`w_t` must be [..., N, D] prototype weights with D = feature_dim = "
          f"{self.feature_dim}, got shape {jnp.shape(w_t)}")
    grad_fn = functools.partial(
        prototypes.support_loss_grad_from_stats, reduction=self.loss_reduction)
    for _ in range(jnp.ndim(w_t) - 2):
      grad_fn = jax.vmap(grad_fn)
    return grad_fn(w_t, stats)

  def denoise_from_time(self, w_t, time: TimeFeatures, stats: prototypes.SupportStats):
    """eps for weights `w_t` [..., N, D] of many episodes at one step, given its features.

    Args:
      w_t: [..., N, D] noisy weights, leading axes over episodes.
      time: one step's `TimeFeatures` (see `from_gradient_and_time`).
      stats: `SupportStats` with the leading axes of `w_t` (sums [..., N, D],
        counts [..., N]).

    Returns:
      eps: [..., N, D]; every block is one matmul over all episodes' rows.
    """
    return self.from_gradient_and_time(self.support_gradient(w_t, stats), time)

  def _check_weights(self, w, name):
    if jnp.ndim(w) != 2 or jnp.shape(w)[-1] != self.feature_dim:
      raise ValueError(
          f"`{name}` must be [N, D] prototype weights with D = feature_dim = "
          f"{self.feature_dim}, got shape {jnp.shape(w)}")


def _check_time(t):
  if jnp.ndim(t) != 0 or not jnp.issubdtype(jnp.result_type(t), jnp.integer):
    raise TypeError(
        f"`t` must be an integer scalar step in [0, T), got {jnp.result_type(t)} of shape "
        f"{jnp.shape(t)}; pass one step per episode (vmap over episodes)")
