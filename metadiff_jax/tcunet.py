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

Widths: D -> h1 -> h2 -> h2 -> h1 -> D with (h1, h2) = (D/2, D/4) by default. Parameters map
one-to-one onto the original's PyTorch names: `time_scale.0` -> `time_scale_0`,
`time_scale.2` -> `time_scale_2`, `time_embB` -> `time_embB`, `proto_infB` -> `proto_infB`
(B = 1..5), each a Dense with kernel = weight.T (see `torch_import`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

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
  """[dim] embedding of a scalar step t, cosines first: [cos(t f), sin(t f)]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(t, jnp.float32) * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


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

    The sampler calls this inside its scan, with `stats` computed once per episode.
    """
    self._check_weights(w_t, "w_t")
    _check_time(t)
    grad = prototypes.support_loss_grad_from_stats(w_t, stats, self.loss_reduction)
    return self.from_gradient(grad, t)

  def from_gradient(self, grad, t):
    """eps from the support-loss gradient `grad` [N, D] and the step t (steps 1-2, 4-5)."""
    e = sinusoidal_time_embedding(t, self.time_embed_dim)
    gate = nn.sigmoid(self.time_scale_2(nn.relu(self.time_scale_0(e))))
    x1 = nn.softplus(self.proto_inf1(grad) * self.time_emb1(e))
    x2 = nn.softplus(self.proto_inf2(x1) * self.time_emb2(e))
    x3 = nn.softplus(self.proto_inf3(x2) * self.time_emb3(e)) + x2
    x4 = nn.softplus(self.proto_inf4(x3) * self.time_emb4(e)) + x1
    x5 = self.proto_inf5(x4) * self.time_emb5(e) + grad
    return gate * grad + (1.0 - gate) * x5

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
