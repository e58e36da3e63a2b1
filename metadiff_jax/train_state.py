"""The train states the stages checkpoint: `flax.training.train_state.TrainState` subclasses.

- `PretrainState`: the backbone and its linear head, with the BatchNorm running statistics.
- `DiffusionState`: the TCUNet, with the EMA copy of its parameters that sampling uses.

Each holds everything a stage needs to resume exactly: parameters, optimiser state and step.
Randomness is not stored: every stage derives its keys as `fold_in(key(seed), step)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from metadiff_jax import diffusion


class PretrainState(train_state.TrainState):
  """Backbone + head parameters and optimiser state, plus the BatchNorm statistics.

  Attributes:
    batch_stats: the `batch_stats` collection of the model (running means and variances).
  """

  batch_stats: Any = None


class DiffusionState(train_state.TrainState):
  """TCUNet parameters, their EMA, and the Adam state.

  Attributes:
    ema_params: the exponential moving average of `params`, used for validation and test.
  """

  ema_params: Any = None


def ema_update(ema_params, params, step, decay: float, start_step: int):
  """The EMA after optimiser step `step` (1-based count of updates done).

  Until `start_step` updates the average is the parameters themselves (the original copies
  them outright for its first 2,000 steps); afterwards ema <- decay ema + (1 - decay) params.
  """
  copy = step <= start_step
  return jax.tree_util.tree_map(
      lambda e, p: jnp.where(copy, p, decay * e + (1.0 - decay) * p), ema_params, params)


def diffusion_step(model, state: DiffusionState, sched, w0, support, labels, key,
                   ema_decay: float, ema_start_step: int):
  """One optimiser step of diffusion training (Algorithm 1) on a batch of episodes.

  The loss is Eq. 12 (`diffusion.loss`) with t and the noise drawn from fold_in(key, step);
  then the optimiser's update and the EMA's. Not jitted: the train stage scans it.

  Args:
    model: the TCUNet. state: its DiffusionState. sched: the training schedule.
    w0: [B, N, D] targets. support: [B, N*K, D] features. labels: [B, N*K] ints in [0, N).
    key: the diffusion key. ema_decay, ema_start_step: as in `ema_update`.

  Returns:
    (state, loss).
  """
  step_key = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    return diffusion.loss(model, {"params": params}, sched, w0, support, labels, step_key)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state.apply_gradients(grads=grads)
  state = state.replace(ema_params=ema_update(state.ema_params, state.params, state.step,
                                              ema_decay, ema_start_step))
  return state, loss


def sgd_l2(learning_rate, momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch's SGD: L2 `weight_decay * params` added to the gradient, then momentum."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None))


def adam_l2(learning_rate, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch's Adam with weight_decay: L2 added to the gradient before Adam, not decoupled."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))

