"""MetaLSTM: the learned LSTM optimizer whose cell state is the learner's weights.

Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017. Gradient
descent, theta_t = theta_{t-1} - eta grad_t, is the cell update of an LSTM, c_t = f_t c_{t-1} +
i_t c~_t, with c_t = theta_t, f_t = 1, i_t = eta and c~_t = -grad_t; the meta-learner learns
the gates instead (their Eqs. 2-4):

  i_t = sigmoid(W_I [x_t, theta_{t-1}, i_{t-1}] + b_I)    (a per-coordinate learning rate)
  f_t = sigmoid(W_F [x_t, theta_{t-1}, f_{t-1}] + b_F)    (a per-coordinate weight decay)
  theta_t = f_t * theta_{t-1} - i_t * grad_t

where x_t is the hidden state of a first, ordinary LSTM over the preprocessed gradient and
loss. Everything is coordinate-wise, with the parameters shared over all coordinates of w, so
the meta-learner is tiny whatever the head's size; the initial weights theta_0 (the cell's c_0)
are learned too. Inputs are preprocessed as in Andrychowicz et al., "Learning to learn by
gradient descent by gradient descent", NeurIPS 2016 (Appendix A): x -> (log|x| / p, sign x) if
|x| >= e^-p, else (-1, e^p x), with p = 10, which spans the gradients' orders of magnitude.

As in the original code, the forget-gate bias starts high and the input-gate bias low (and the
gate weights near zero), so that the untrained optimizer is plain gradient descent with a
small step (`learning_rate`) and a slight decay (sigmoid(`forget_bias`) ~ 0.993). Unlike the
original, which ignores the meta-gradient through the learner's gradients, the inner gradients
here are differentiated (second order), like the other baselines (`first_order=True` restores
the original's approximation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from metadiff_jax.metaopt import base

GATE_WEIGHT_SCALE = 0.01  # the original's U(-0.01, 0.01) for W_I and W_F


def preprocess(x, p: float = 10.0) -> jnp.ndarray:
  """Andrychowicz et al.'s log/sign preprocessing: [...] -> [..., 2].

  The log is taken of |x| clamped at e^-p, so that the unused branch has finite gradients.
  """
  threshold = math.exp(-p)
  large = jnp.abs(x) >= threshold
  log_part = jnp.where(large, jnp.log(jnp.maximum(jnp.abs(x), threshold)) / p, -1.0)
  sign_part = jnp.where(large, jnp.sign(x), x / threshold)
  return jnp.stack([log_part, sign_part], axis=-1)


def lstm_cell(params, inputs, hidden, cell):
  """A standard LSTM cell (gates i, f, g, o): inputs [P, F], hidden, cell [P, H] -> new (h, c)."""
  gates = jnp.concatenate([inputs, hidden], -1) @ params["kernel"] + params["bias"]
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(cell), cell


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetaLSTM(base.MetaOptimizer):
  """Ravi & Larochelle's coordinate-wise meta-learner LSTM.

  Attributes:
    hidden: H, the first-layer LSTM's width (20 in the original).
    learning_rate: the untrained input gate, sigmoid(b_I): b_I = logit(learning_rate). The
      original draws b_I from U(-5, -4), a rate of 0.007-0.018.
    forget_bias: the untrained forget gate's bias b_F (the original: U(4, 6)).
    init_std: the standard deviation of the learned theta_0's initial value (small, as ANIL's).
    preprocess_p: p of the gradient and loss preprocessing.
  """

  hidden: int = 20
  learning_rate: float = 0.01
  forget_bias: float = 5.0
  init_std: float = 0.01
  preprocess_p: float = 10.0

  trainable: ClassVar[bool] = True
  intervals: ClassVar[dict[str, str]] = {"learning_rate": "(0, 1)"}  # a sigmoid gate's value

  def init(self, key) -> dict:
    """{"lstm": first layer, "input_gate", "forget_gate": {"kernel" [H + 2], "bias"}, "theta0"}."""
    h = self.hidden
    k_lstm, k_input, k_forget, k_theta = jax.random.split(key, 4)
    bound = 1.0 / math.sqrt(h)  # PyTorch's LSTMCell init, which the original uses

    def uniform(k, shape, scale):
      return jax.random.uniform(k, shape, jnp.float32, -scale, scale)

    k_kernel, k_bias = jax.random.split(k_lstm)
    return {
        "lstm": {"kernel": uniform(k_kernel, (4 + h, 4 * h), bound),
                 "bias": uniform(k_bias, (4 * h,), bound)},
        "input_gate": {"kernel": uniform(k_input, (h + 2,), GATE_WEIGHT_SCALE),
                       "bias": jnp.asarray(math.log(self.learning_rate)
                                           - math.log1p(-self.learning_rate), jnp.float32)},
        "forget_gate": {"kernel": uniform(k_forget, (h + 2,), GATE_WEIGHT_SCALE),
                        "bias": jnp.asarray(self.forget_bias, jnp.float32)},
        "theta0": self.random_weights(k_theta, self.init_std),
    }

  def adapt(self, params, support, labels, key) -> jnp.ndarray:
    """`steps` steps of the meta-learner LSTM on one episode.

    Args:
      params: `init`'s pytree.
      support: [S, D] features; labels: [S] ints in [0, N).
      key: unused (theta_0 is learned, not drawn).

    Returns:
      [N, Dw] weights.
    """
    del key
    shape = self.weight_shape
    coords = shape[0] * shape[1]

    def gate(gate_params, x, theta, previous):
      z = jnp.concatenate([x, theta[:, None], previous[:, None]], -1) @ gate_params["kernel"]
      return jax.nn.sigmoid(z + gate_params["bias"])

    def step(carry, _):
      theta, h, c, f, i = carry
      w = theta.reshape(shape)
      loss = self.support_loss(w, support, labels)
      grad = self.support_grad(w, support, labels).reshape(-1)
      if self.first_order:
        loss = jax.lax.stop_gradient(loss)
      inputs = jnp.concatenate(
          [preprocess(grad, self.preprocess_p),
           jnp.broadcast_to(preprocess(loss, self.preprocess_p), (coords, 2))], -1)
      h, c = lstm_cell(params["lstm"], inputs, h, c)
      i = gate(params["input_gate"], h, theta, i)  # Ravi & Larochelle Eq. 3
      f = gate(params["forget_gate"], h, theta, f)  # Eq. 4
      return (f * theta - i * grad, h, c, f, i), None  # Eq. 2, the cell update

    zeros = jnp.zeros((coords,), jnp.float32)
    state = jnp.zeros((coords, self.hidden), jnp.float32)
    carry = (params["theta0"].reshape(-1), state, state, zeros, zeros)
    (theta, *_), _ = jax.lax.scan(step, carry, None, length=self.steps)
    return theta.reshape(shape)
