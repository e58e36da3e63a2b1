"""ANIL: MAML's learned initialisation, on the head only, with a learned inner step size.

Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML", ICLR 2020: MAML (Finn et al., 2017) with the inner loop restricted to
the final layer. Here the features are frozen anyway, so ANIL meta-learns the head's initial
weights w_0 [N, Dw] and one inner learning rate (Meta-SGD's learned rates, Li et al. 2017,
reduced to a scalar), and adapts by plain gradient descent, w_{k+1} = w_k - eta * dL(w_k)/dw,
differentiating the query loss through all `steps` steps (second order).

The rate is stored as log(eta), so that Adam's steps on it are relative and eta stays
positive.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from metadiff_jax.metaopt import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class ANIL(base.MetaOptimizer):
  """Learned initial weights and inner learning rate; gradient descent inside.

  Attributes:
    init_learning_rate: eta before meta-training (as GDA's default).
    init_std: the standard deviation of the learned init's initial value. Small by default:
      both heads score queries well from near-zero weights plus a few gradient steps (cosine
      scoring is scale-free; cross-entropy at w = 0 is uniform), so meta-training starts
      from untrained GDA without a random bias.
  """

  init_learning_rate: float = 0.1
  init_std: float = 0.01

  trainable: ClassVar[bool] = True
  intervals: ClassVar[dict[str, str]] = {"init_learning_rate": "(0, inf)"}

  def init(self, key) -> dict:
    """{"init": [N, Dw] w_0, "log_lr": scalar log(eta)}."""
    return {"init": self.random_weights(key, self.init_std),
            "log_lr": jnp.asarray(math.log(self.init_learning_rate), jnp.float32)}

  def adapt(self, params, support, labels, key) -> jnp.ndarray:
    """`steps` gradient steps from the learned init on one episode.

    Args:
      params: `init`'s pytree.
      support: [S, D] features; labels: [S] ints in [0, N).
      key: unused (the init is learned, not drawn).

    Returns:
      [N, Dw] weights.
    """
    del key
    learning_rate = jnp.exp(params["log_lr"])

    def step(w, _):
      return w - learning_rate * self.support_grad(w, support, labels), None

    w, _ = jax.lax.scan(step, params["init"], None, length=self.steps)
    return w
