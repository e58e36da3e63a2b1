"""Gradient descent from random weights: the paper's Eq. 4, and its heavy-ball variant.

Zhang et al., "MetaDiff: Meta-Learning with Conditional Diffusion for Few-Shot Learning",
AAAI 2024: Eq. 4, w_{k+1} = w_k - eta * dL(w_k)/dw, is the inner loop that MetaDiff's
denoising steps generalise; Table 2 (i) runs it from random weights, and Table 2 (ii) with
momentum (Polyak's heavy ball, in PyTorch's form v_{k+1} = mu v_k + g_k,
w_{k+1} = w_k - eta v_{k+1}). Nothing is meta-learned: the learning rate and the step count
are hyperparameters (tuned on validation episodes by the analysis stage).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from metadiff_jax.metaopt import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class GDA(base.MetaOptimizer):
  """Eq. 4 from w_0 ~ N(0, init_std^2 I), optionally with heavy-ball momentum.

  Attributes:
    learning_rate: eta. With the prototype head's summed Eq. 11 the iteration contracts for
      eta < 1 / n_k (n_k the class's shots); 0.1 suits 1- to 5-shot.
    momentum: mu; 0 is plain GDA (Table 2 (i)), > 0 heavy ball (Table 2 (ii)).
    init_std: the standard deviation of the random initial weights.
  """

  learning_rate: float = 0.1
  momentum: float = 0.0
  init_std: float = 1.0

  trainable: ClassVar[bool] = False
  intervals: ClassVar[dict[str, str]] = {"momentum": "[0, 1)"}

  def init(self, key) -> dict:
    del key  # nothing to meta-learn
    return {}

  def adapt(self, params, support, labels, key) -> jnp.ndarray:
    """`steps` steps of Eq. 4 on one episode.

    Args:
      params: {} (unused).
      support: [S, D] features; labels: [S] ints in [0, N).
      key: draws w_0 [N, Dw].

    Returns:
      [N, Dw] weights.
    """
    del params
    w0 = self.random_weights(key, self.init_std)

    def step(carry, _):
      w, velocity = carry
      grad = self.support_grad(w, support, labels)
      velocity = self.momentum * velocity + grad if self.momentum else grad
      return (w - self.learning_rate * velocity, velocity), None  # Eq. 4

    (w, _), _ = jax.lax.scan(step, (w0, jnp.zeros_like(w0)), None, length=self.steps)
    return w
