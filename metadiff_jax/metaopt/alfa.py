"""ALFA: per-step learning rates and weight decays generated from the inner loop's state.

Baik, Choi, Kim, Cho, Min & Lee, "Meta-Learning with Adaptive Hyperparameters", NeurIPS 2020.
The inner update is w_{j+1} = beta_j * w_j - alpha_j * grad_j (their Section 3), where, for each
weight tensor l, alpha_j^l and beta_j^l are a small network's output on the tensors' state
tau_j = [mean(grad_j^l), mean(w_j^l)]_l, times learned per-step (and per-tensor) base values:
alpha_j = alpha0_j * g_alpha(tau_j), beta_j = beta0_j * g_beta(tau_j). Table 2 of MetaDiff uses
"ALFA + random init": w_0 is drawn, not learned (as here; the paper's Table 4 uses the same
with the linear head).

The generator is an MLP with two hidden ReLU layers (as the original's 3-layer network) whose
last layer starts at zero and is read as 1 + output: untrained, every multiplier is 1, so
untrained ALFA is plain GDA with step size `learning_rate`, and meta-training starts from it.
Tensors: the prototype head's w [N, D] is one; the linear head's W [N, D] and b [N] are two.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from metadiff_jax.metaopt import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class ALFA(base.MetaOptimizer):
  """ALFA + random init.

  Attributes:
    learning_rate: alpha0_j's initial value (as GDA's default).
    width: the generator's hidden width.
    init_std: the standard deviation of the random initial weights w_0 (as GDA's).
  """

  learning_rate: float = 0.1
  width: int = 16
  init_std: float = 1.0

  trainable: ClassVar[bool] = True

  @property
  def num_tensors(self) -> int:
    """How many weight tensors the head has: 1 (prototypes) or 2 (W and b)."""
    return 2 if self.head == "linear" else 1

  def init(self, key) -> dict:
    """{"alpha0", "beta0": [steps, T], "generator": [3 dense layers {"kernel", "bias"}]}."""
    t = self.num_tensors
    sizes = (2 * t, self.width, self.width)
    keys = jax.random.split(key, 2)
    he = jax.nn.initializers.he_normal()
    layers = [{"kernel": he(k, (m, self.width), jnp.float32),
               "bias": jnp.zeros((self.width,), jnp.float32)} for k, m in zip(keys, sizes)]
    # Zero last layer: multipliers 1 + 0, i.e. untrained ALFA is GDA (see the module doc).
    layers.append({"kernel": jnp.zeros((self.width, 2 * t), jnp.float32),
                   "bias": jnp.zeros((2 * t,), jnp.float32)})
    return {"alpha0": jnp.full((self.steps, t), self.learning_rate, jnp.float32),
            "beta0": jnp.ones((self.steps, t), jnp.float32),
            "generator": layers}

  def _tensor_means(self, x) -> jnp.ndarray:
    """[T] the mean of each weight tensor of x [N, Dw]."""
    if self.head == "linear":
      return jnp.stack([jnp.mean(x[:, :-1]), jnp.mean(x[:, -1])])
    return jnp.mean(x)[None]

  def _per_column(self, values) -> jnp.ndarray:
    """[T] per-tensor values -> [Dw], each weight column's tensor's value."""
    if self.head == "linear":
      return jnp.concatenate([jnp.full((self.feature_dim,), values[0]), values[1:]])
    return jnp.full((self.feature_dim,), values[0])

  def generate(self, generator, grad, w):
    """(alpha, beta) multipliers [T] each from tau = [mean grads, mean weights] per tensor."""
    x = jnp.concatenate([self._tensor_means(grad), self._tensor_means(w)])
    for layer in generator[:-1]:
      x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    out = 1.0 + x @ generator[-1]["kernel"] + generator[-1]["bias"]
    return jnp.split(out, 2)

  def adapt(self, params, support, labels, key) -> jnp.ndarray:
    """`steps` ALFA steps on one episode.

    Args:
      params: `init`'s pytree.
      support: [S, D] features; labels: [S] ints in [0, N).
      key: draws w_0 [N, Dw].

    Returns:
      [N, Dw] weights.
    """
    w0 = self.random_weights(key, self.init_std)

    def step(w, base_values):
      alpha0, beta0 = base_values
      grad = self.support_grad(w, support, labels)
      alpha, beta = self.generate(params["generator"], grad, w)
      alpha, beta = self._per_column(alpha0 * alpha), self._per_column(beta0 * beta)
      return beta * w - alpha * grad, None  # Baik et al.'s update: a decay and a step

    w, _ = jax.lax.scan(step, w0, (params["alpha0"], params["beta0"]))
    return w
