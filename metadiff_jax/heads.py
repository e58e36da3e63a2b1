"""The base learners that meta-optimizers adapt: the prototype and the linear classifier head.

Every meta-optimizer of the paper's analyses (Tables 2-4), MetaDiff included, produces the
weights `w` of one of two heads from a support set, and the queries are scored by that head:

- "prototype" (the paper's base learner, Section 4.2): w [N, D], one prototype per class; the
  support loss is Eq. 11, c * sum_i ||w_{y_i} - f_i||^2, and queries are scored by
  10 x cos(f, w_k), the original code's classifier.
- "linear" (Table 4): w [N, D + 1], each row a class's weights with its bias last; logits are
  W f + b, and the support loss is the cross-entropy of those logits.

All functions work on one episode (vmap them for many): `support: [S, D]` features with
`labels: [S]` ints in [0, N), queries `query: [Q, D]`. `reduction` is "sum" (the original
code's Eq. 11, the default) or "mean" (divide by |S|), for both heads.

`fit_linear` solves for the linear head on many labelled features: MetaDiff-linear's diffusion
target w0 of an episode (Algorithm 1, line 3, with the linear head in place of class means).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metadiff_jax import prototypes
from metadiff_jax.errors import ConfigError

HEADS = ("prototype", "linear")
COSINE_SCALE = 10.0  # the original code's query classifier: 10 x cosine


def check_head(head: str) -> None:
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}: use one of {HEADS}")


def check_config(denoiser) -> None:
  """Raises a ConfigError where a config's `denoiser` section names an unknown head."""
  if denoiser.head not in HEADS:
    raise ConfigError(f"config.denoiser.head must be one of {', '.join(HEADS)}, got "
                      f"{denoiser.head!r}")


def weight_dim(head: str, feature_dim: int) -> int:
  """Width of a head's weight rows: D for prototypes, D + 1 (the bias) for the linear head."""
  check_head(head)
  return feature_dim + (head == "linear")


def logits(head: str, w, query) -> jnp.ndarray:
  """[..., Q, N] logits of queries [..., Q, D] under weights w [..., N, D or D + 1]."""
  check_head(head)
  if head == "prototype":
    return prototypes.cosine_logits(query, w, scale=COSINE_SCALE)
  return jnp.einsum("...qd,...nd->...qn", query, w[..., :-1]) + w[..., None, :, -1]


def cross_entropy(logits_, labels, reduction: str = "mean") -> jnp.ndarray:
  """Softmax cross-entropy of logits [S, N] against int labels [S], summed or averaged."""
  log_p = jax.nn.log_softmax(logits_, axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
  return _reduce(nll, reduction, logits_.shape[-1])


def support_loss(head: str, w, support, labels, reduction: str = "sum") -> jnp.ndarray:
  """The head's support loss: Eq. 11 for prototypes, cross-entropy for the linear head."""
  check_head(head)
  if head == "prototype":
    return prototypes.support_loss(w, support, labels, reduction)
  return cross_entropy(logits("linear", w, support), labels, reduction)


def support_grad(head: str, w, support, labels, reduction: str = "sum") -> jnp.ndarray:
  """d support_loss / dw, like `w`; Eq. 11's in closed form, the linear head's by autodiff.

  Differentiable again (the unrolled baselines differentiate through it: second order).
  """
  check_head(head)
  if head == "prototype":
    return prototypes.support_loss_grad(w, support, labels, reduction)
  return jax.grad(support_loss, argnums=1)(head, w, support, labels, reduction)


def cosine_ce_loss(w, support, labels, reduction: str = "sum") -> jnp.ndarray:
  """Cross-entropy of the support set under the query classifier's own 10 x cosine logits.

  Table 3 (ii): the loss whose gradient replaces Eq. 11's as the TCUNet's input.
  """
  return cross_entropy(logits("prototype", w, support), labels, reduction)


def cosine_ce_grad(w, support, labels, reduction: str = "sum") -> jnp.ndarray:
  """d cosine_ce_loss / dw: [N, D]."""
  return jax.grad(cosine_ce_loss)(w, support, labels, reduction)


def query_loss(head: str, w, query, labels) -> jnp.ndarray:
  """Mean cross-entropy of the queries under the head: the outer loss of bi-level training."""
  return cross_entropy(logits(head, w, query), labels, "mean")


def accuracy(head: str, w, query, labels) -> jnp.ndarray:
  """Fraction of queries [Q, D] whose arg-max logit is their label [Q]."""
  return jnp.mean(jnp.argmax(logits(head, w, query), axis=-1) == labels)


def fit_linear(features, labels, mask, ways: int, steps: int, l2: float) -> jnp.ndarray:
  """The N-way linear head fit by cross-entropy on labelled features: [N, D + 1].

  Minimises  mean_{i: mask_i} CE(W f_i + b, y_i) + l2 * ||W||^2  (the bias is not penalised)
  by `steps` steps of Nesterov's accelerated gradient from zero with step size 1 / L, where
  L = max_i (||f_i||^2 + 1) / 2 + 2 * l2 bounds the curvature. A fixed step count keeps it one
  compiled loop; jit- and vmap-able (one solve per episode).

  Args:
    features: [M, D] features, some of them padding.
    labels: [M] ints in [0, N).
    mask: [M] bool, True for the real examples.
    ways: N.
    steps: gradient steps.
    l2: the weight penalty (> 0 keeps the optimum finite on separable data).
  """
  features = jnp.asarray(features, jnp.float32)
  weights = mask.astype(jnp.float32) / jnp.maximum(jnp.sum(mask), 1)
  x = jnp.concatenate([features, jnp.ones_like(features[:, :1])], axis=-1)
  curvature = 0.5 * jnp.max(jnp.where(mask, jnp.sum(x * x, -1), 0.0)) + 2.0 * l2
  lr = 1.0 / curvature
  penalty = jnp.ones((x.shape[-1],)).at[-1].set(0.0)

  def objective(w):
    nll = -jnp.take_along_axis(jax.nn.log_softmax(x @ w.T, -1), labels[:, None], -1)[:, 0]
    return jnp.sum(weights * nll) + l2 * jnp.sum(jnp.square(w) * penalty)

  def step(carry, k):
    w, previous = carry
    look = w + (k / (k + 3.0)) * (w - previous)
    return (look - lr * jax.grad(objective)(look), w), None

  w = jnp.zeros((ways, x.shape[-1]), jnp.float32)
  (w, _), _ = jax.lax.scan(step, (w, w), jnp.arange(steps, dtype=jnp.float32))
  return w


def _reduce(values, reduction: str, num_classes: int):
  if reduction == "sum":
    return jnp.sum(values)
  if reduction == "mean":
    return jnp.mean(values)
  if reduction == "shot_mean":  # the mean within each class, summed over the N classes
    return num_classes * jnp.mean(values)
  raise ValueError(f"unknown reduction {reduction!r}: use one of {prototypes.REDUCTIONS}")
