"""What every meta-optimizer baseline shares: the method interface, episode batches, the
bi-level objective, the meta-training step and its compiled memory.

A method (`GDA`, `ANIL`, `MetaLSTM`, `ALFA`) is a frozen, hashable dataclass, so that it can be
a static argument of `jax.jit`; its meta-parameters are a separate pytree (`init`), and
`adapt(params, support, labels, key)` turns one episode's support set into the weights of a
head (`metadiff_jax.heads`) by `steps` inner steps. The inner loop is a `lax.scan`, so that
differentiating through it keeps one step's residuals per step: the memory of a meta-training
step grows linearly with `steps` (what the paper's Figure 4 measures against MetaDiff, whose
training step does not unroll anything). Inner gradients are `heads.support_grad`, which stays
differentiable: meta-gradients are second order unless a method sets `first_order=True`.

Episodes are vmapped with the meta-parameters broadcast (as jax-meta-learning's
`metalearners/base.py` does); each episode gets its own key, for its random initial weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from metadiff_jax import heads, prototypes


# The intervals of the fields every method has; a method's `intervals` adds its own.
FIELD_INTERVALS = {"ways": "[1, inf)", "feature_dim": "[1, inf)", "steps": "[0, inf)"}


def lies_in(value: float, interval: str) -> bool:
  """Whether `value` lies in `interval`, written as "[0, 1)": a bracket includes its end, a
  parenthesis excludes it, and inf stands for no bound."""
  low, high = (float(end) for end in interval[1:-1].split(","))
  above = value >= low if interval[0] == "[" else value > low
  below = value <= high if interval[-1] == "]" else value < high
  return above and below


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetaOptimizer:
  """Fields every method has; subclasses add their hyperparameters and the two methods.

  Attributes:
    head: "prototype" (weights [N, D]) or "linear" (weights [N, D + 1]).
    ways: N, the classes of an episode.
    feature_dim: D, the width of the features.
    steps: inner steps on the support set.
    reduction: "sum" (the original code's Eq. 11) or "mean" of the support loss.
    first_order: drop the second-order terms (stop_gradient on the inner gradients); off by
      default, as the unrolled baselines of the paper differentiate through them.
    trainable: (class attribute) whether `init` returns anything to meta-train.
    intervals: (class attribute) the interval each of a subclass's hyperparameters must lie
      in, checked on construction as those of the fields above (`FIELD_INTERVALS`).
  """

  head: str
  ways: int
  feature_dim: int
  steps: int
  reduction: str = "sum"
  first_order: bool = False

  trainable: ClassVar[bool] = False
  intervals: ClassVar[dict[str, str]] = {}

  def __post_init__(self):
    heads.check_head(self.head)
    if self.reduction not in prototypes.REDUCTIONS:
      raise ValueError(f"unknown reduction {self.reduction!r}: use one of "
                       f"{prototypes.REDUCTIONS}")
    for name, interval in {**FIELD_INTERVALS, **self.intervals}.items():
      value = getattr(self, name)
      if not lies_in(value, interval):
        raise ValueError(f"{type(self).__name__}.{name} must lie in {interval}, got {value}")

  @property
  def weight_shape(self) -> tuple[int, int]:
    """(N, Dw): the shape of the head's weights, Dw = D (prototype) or D + 1 (linear)."""
    return (self.ways, heads.weight_dim(self.head, self.feature_dim))

  def init(self, key) -> Any:
    """The meta-parameters before meta-training (a pytree; {} for methods with none)."""
    raise NotImplementedError

  def adapt(self, params, support, labels, key) -> jnp.ndarray:
    """The head's weights [N, Dw] adapted to one episode's support [S, D], labels [S]."""
    raise NotImplementedError

  def support_loss(self, w, support, labels) -> jnp.ndarray:
    """The head's support loss of weights w [N, Dw] (a scalar)."""
    return heads.support_loss(self.head, w, support, labels, self.reduction)

  def support_grad(self, w, support, labels) -> jnp.ndarray:
    """d support_loss / dw [N, Dw]; differentiable again unless `first_order`."""
    grad = heads.support_grad(self.head, w, support, labels, self.reduction)
    return jax.lax.stop_gradient(grad) if self.first_order else grad

  def random_weights(self, key, std: float) -> jnp.ndarray:
    """[N, Dw] initial weights ~ N(0, std^2 I): the random init of GDA and ALFA."""
    return std * jax.random.normal(key, self.weight_shape, jnp.float32)


class MetaState(train_state.TrainState):
  """The meta-parameters, their Adam state and the outer step count.

  `apply_fn` is None: the method (a static argument) adapts, not the state.
  """


def adapt_batch(method: MetaOptimizer, params, support, labels, keys) -> jnp.ndarray:
  """Adapted weights of a batch of episodes, the meta-parameters shared.

  Args:
    method: the meta-optimizer.
    params: its meta-parameters.
    support: [B, S, D] support features.
    labels: [B, S] ints in [0, N).
    keys: [B] typed keys, one per episode.

  Returns:
    [B, N, Dw] weights.
  """
  return jax.vmap(method.adapt, in_axes=(None, 0, 0, 0))(params, support, labels, keys)


def outer_loss(method: MetaOptimizer, params, support, labels, query, query_labels,
               keys) -> jnp.ndarray:
  """The bi-level objective: the mean over episodes of the query loss of the adapted weights.

  Args:
    method, params, support [B, S, D], labels [B, S], keys [B]: as `adapt_batch`.
    query: [B, Q, D] query features.
    query_labels: [B, Q] ints in [0, N).

  Returns:
    A scalar: mean_b heads.query_loss(w_b, query_b, query_labels_b).
  """
  w = adapt_batch(method, params, support, labels, keys)
  losses = jax.vmap(heads.query_loss, in_axes=(None, 0, 0, 0))(method.head, w, query,
                                                                query_labels)
  return jnp.mean(losses)


def episode_accuracy(method: MetaOptimizer, params, support, labels, query, query_labels,
                     keys) -> jnp.ndarray:
  """[B] query accuracy of each episode's adapted weights (arguments as `outer_loss`)."""
  w = adapt_batch(method, params, support, labels, keys)
  return jax.vmap(heads.accuracy, in_axes=(None, 0, 0, 0))(method.head, w, query, query_labels)


def create_state(method: MetaOptimizer, key, learning_rate: float,
                 clip_norm: float = 10.0) -> MetaState:
  """The meta-training state: `method.init(key)`, optimised by Adam on clipped gradients.

  The clip guards against the rare exploding meta-gradient of an unrolled inner loop (large
  learned step sizes make the unrolled map expansive). On the tests' synthetic episodes it
  binds on a few percent of ALFA's steps (its generator reads raw gradient means) and almost
  never for ANIL or MetaLSTM; all three also train without it.
  """
  tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))
  return MetaState.create(apply_fn=None, params=method.init(key), tx=tx)


def meta_train_step(method: MetaOptimizer, state: MetaState, support, labels, query,
                    query_labels, key):
  """One outer step: the gradient of `outer_loss` through the inner loop, then Adam.

  Episode b's inner-loop key is split(fold_in(key, state.step), B)[b], so that a resumed run
  draws what the uninterrupted one did. Not jitted: callers scan it.

  Args:
    method: the meta-optimizer (static).
    state: its MetaState.
    support: [B, S, D]; labels: [B, S]; query: [B, Q, D]; query_labels: [B, Q].
    key: the meta-training key.

  Returns:
    (the updated state, the outer loss before the update).
  """
  keys = jax.random.split(jax.random.fold_in(key, state.step), support.shape[0])

  def loss_fn(params):
    return outer_loss(method, params, support, labels, query, query_labels, keys)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def compiled_bytes(compiled) -> int:
  """Bytes of a compiled executable's buffers: arguments + outputs + temporaries - aliased.

  The definition of `benchmarks/memory.py`: donated arguments that become outputs share their
  buffers, so they are counted once.
  """
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory_analysis()")
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def train_step_memory(method: MetaOptimizer, episodes: int, shots: int, queries: int,
                      compiler_options: dict | None = None) -> int:
  """Compiled memory (bytes) of one `meta_train_step` on a batch, without running it.

  Compiles `jax.jit(meta_train_step, static_argnums=0, donate_argnums=1)` (the state donated,
  as a training loop does) on abstract inputs of `episodes` N-way episodes with `shots`
  support and `queries` query examples per class.

  Args:
    method: the meta-optimizer.
    episodes, shots, queries: B, and the support and query examples per class.
    compiler_options: XLA options for the compile, e.g.
      {"xla_backend_optimization_level": 0}, which halves CPU compile times; it changes the
      generated code, not the buffer assignment that the bytes come from (the tests check
      that on CPU).

  Returns:
    Arguments + outputs + temporaries - aliased bytes (`compiled_bytes`).
  """
  n, d = method.ways, method.feature_dim
  key = jax.eval_shape(jax.random.key, 0)
  state = jax.eval_shape(lambda k: create_state(method, k, 1e-3), key)
  f32, i32 = jnp.float32, jnp.int32
  support = jax.ShapeDtypeStruct((episodes, n * shots, d), f32)
  labels = jax.ShapeDtypeStruct((episodes, n * shots), i32)
  query = jax.ShapeDtypeStruct((episodes, n * queries, d), f32)
  query_labels = jax.ShapeDtypeStruct((episodes, n * queries), i32)
  step = jax.jit(meta_train_step, static_argnums=0, donate_argnums=1)
  lowered = step.lower(method, state, support, labels, query, query_labels, key)
  return compiled_bytes(lowered.compile(compiler_options))
