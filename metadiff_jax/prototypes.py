"""The prototype classifier: class statistics, the support loss of Eq. 11 and its gradient.

All functions here work on one episode (vmap them for many): `support: [S, D]` features with
`labels: [S]` ints in [0, N), and prototype weights `w: [N, D]`, one row per class. The logit
functions broadcast over leading axes.

The support loss is L(w) = c * sum_i ||w_{y_i} - f_i||^2 (Eq. 11), with c = 1 in the original
code (`reduction="sum"`, the default), c = 1/|S| in the paper's text (`reduction="mean"`), or
c = N/|S| = 1/K, the mean within each class summed over classes (`reduction="shot_mean"`,
docs/STABILITY.md: its gradient, 2 (w_k - m_k) for K shots of each class, does not grow
with K).
Its gradient has the closed form dL/dw_k = 2c (n_k w_k - sum_{i: y_i = k} f_i), where n_k is
the number of support examples of class k; it needs only the class sums and counts, which are
constant over an episode's reverse diffusion and so are computed once (`support_stats`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("sum", "mean", "shot_mean")


class SupportStats(NamedTuple):
  """What the support-loss gradient needs of a support set.

  Attributes:
    sums: [N, D] per-class sums of the support features.
    counts: [N] float number of support examples per class.
  """

  sums: jnp.ndarray
  counts: jnp.ndarray


def check_episode(support, labels, name: str = "support"):
  """Raises a clear error at trace time for wrong ranks, lengths or label dtypes."""
  if jnp.ndim(support) != 2:
    raise ValueError(f"`{name}` must be [S, D] features, got shape {jnp.shape(support)}")
  if jnp.ndim(labels) != 1:
    raise ValueError(f"`{name}_labels` must be [S] ints, got shape {jnp.shape(labels)}")
  if jnp.shape(labels)[0] != jnp.shape(support)[0]:
    raise ValueError(
        f"`{name}_labels` has {jnp.shape(labels)[0]} labels per episode but `{name}` has "
        f"S = {jnp.shape(support)[0]} examples")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f"`{name}_labels` must hold integers, got {jnp.result_type(labels)}")


def check_in_range(values, upper: int, name: str, hint: str = ""):
  """Raises ValueError if concrete integer `values` fall outside [0, upper); skips tracers."""
  if isinstance(values, jax.core.Tracer):
    return
  values = np.asarray(values)
  if values.size and (values.min() < 0 or values.max() >= upper):
    raise ValueError(f"`{name}` must lie in [0, {upper}), got values in "
                     f"[{values.min()}, {values.max()}]{hint}")


def check_labels(labels, num_classes: int, name: str = "support_labels"):
  """Raises ValueError if concrete `labels` fall outside [0, num_classes).

  Under a trace the values are unknown; `support_stats` then turns out-of-range labels into
  NaN statistics so that the error cannot pass silently.
  """
  check_in_range(labels, num_classes, name,
                 hint=f" for {num_classes} classes; relabel each episode's classes 0..N-1")


def class_counts(labels, num_classes: int) -> jnp.ndarray:
  """[N] float number of examples per class; out-of-range labels are not counted."""
  return jax.ops.segment_sum(jnp.ones(jnp.shape(labels), jnp.float32), labels, num_classes)


def class_sums(features, labels, num_classes: int) -> jnp.ndarray:
  """[N, D] per-class sums of `features` [S, D] by a scatter-add."""
  return jax.ops.segment_sum(features, labels, num_classes)


def class_means(features, labels, num_classes: int) -> jnp.ndarray:
  """[N, D] per-class means of `features` [S, D]; a class with no example gets zeros."""
  counts = class_counts(labels, num_classes)
  return class_sums(features, labels, num_classes) / jnp.maximum(counts, 1.0)[:, None]


def support_stats(support, labels, num_classes: int) -> SupportStats:
  """Class sums and counts of a support set; NaN everywhere if a label is outside [0, N)."""
  check_episode(support, labels)
  in_range = jnp.all((labels >= 0) & (labels < num_classes))
  poison = jnp.where(in_range, 0.0, jnp.nan).astype(support.dtype)
  sums = class_sums(support, labels, num_classes) + poison
  counts = class_counts(labels, num_classes) + poison.astype(jnp.float32)
  return SupportStats(sums=sums, counts=counts)


def support_loss(w, support, labels, reduction: str = "sum") -> jnp.ndarray:
  """Eq. 11: c * sum_i ||w_{y_i} - f_i||^2, c = 1 ("sum"), 1/|S| ("mean") or N/|S|
  ("shot_mean").

  Args:
    w: [N, D] prototype weights.
    support: [S, D] support features.
    labels: [S] ints in [0, N).
    reduction: "sum" (the original code), "mean" (the paper's text) or "shot_mean".

  Returns:
    A scalar.
  """
  check_episode(support, labels)
  per_example = jnp.sum((w[labels] - support) ** 2, axis=-1)
  return _reduction_factor(reduction, support.shape[0], w.shape[0]) * jnp.sum(per_example)


def support_loss_grad_from_stats(w, stats: SupportStats, reduction: str = "sum"):
  """dL/dw of Eq. 11 in closed form, 2c (n_k w_k - sum_{y_i = k} f_i): [N, D]."""
  scale = 2.0 * _reduction_factor(reduction, jnp.sum(stats.counts), stats.counts.shape[-1])
  return scale * (stats.counts[:, None] * w - stats.sums)


def support_loss_grad(w, support, labels, reduction: str = "sum") -> jnp.ndarray:
  """dL/dw of Eq. 11 in closed form for `w` [N, D]; equals `jax.grad(support_loss)`."""
  return support_loss_grad_from_stats(w, support_stats(support, labels, w.shape[0]), reduction)


def cosine_logits(query, prototypes, scale: float = 10.0, eps: float = 1e-12) -> jnp.ndarray:
  """scale * cos(query, prototype): [..., Q, D] x [..., N, D] -> [..., Q, N].

  Norms are clamped below at `eps` (as `torch.nn.functional.normalize` does), so a zero
  vector gives zero logits rather than NaN.
  """
  q = query / jnp.maximum(jnp.linalg.norm(query, axis=-1, keepdims=True), eps)
  p = prototypes / jnp.maximum(jnp.linalg.norm(prototypes, axis=-1, keepdims=True), eps)
  return scale * jnp.einsum("...qd,...nd->...qn", q, p)


def euclidean_logits(query, prototypes) -> jnp.ndarray:
  """-||query - prototype||^2: [..., Q, D] x [..., N, D] -> [..., Q, N]."""
  return -jnp.sum((query[..., :, None, :] - prototypes[..., None, :, :]) ** 2, axis=-1)


def _reduction_factor(reduction: str, num_support, num_classes):
  """c of Eq. 11: 1 for "sum", 1/|S| for "mean", N/|S| (1/K) for "shot_mean"."""
  if reduction == "sum":
    return 1.0
  if reduction == "mean":
    return 1.0 / num_support
  if reduction == "shot_mean":
    return num_classes / num_support
  raise ValueError(f"unknown support-loss reduction {reduction!r}: use one of {REDUCTIONS}")


class LinearShrinkage(NamedTuple):
  """Prototypes mu + (m_hat - mu) A from support class means m_hat (`fit_linear_shrinkage`).

  Attributes:
    center: [D] mu, the mean of the base classes' means.
    matrix: [D, D] A.
  """

  center: jnp.ndarray
  matrix: jnp.ndarray

  def __call__(self, means):
    """[..., N, D] the shrunk prototypes of support class means [..., N, D]."""
    return self.center + jnp.matmul(means - self.center, self.matrix, precision="highest")


def fit_linear_shrinkage(features, labels, shots: int, draws: int, l2: float,
                         seed: int = 0) -> LinearShrinkage:
  """The linear map that best predicts a class's mean from the mean of K of its images.

  On labelled (base) features: for each class, `draws` random K-subsets of its images give
  support means m; A minimises sum ||(m - mu) A - (t - mu)||^2 + l2 n ||A||^2 over the n draws,
  t their class's mean over all its images and mu the mean of the class means (a ridge
  regression, solved in closed form in float64). It is the linear estimator of the class mean
  that a Gaussian model of classes implies, with its statistics taken from the base classes.

  Args:
    features: [n, D] features. labels: [n] classes in [0, C), each with at least `shots` images.
    shots: K. draws: subsets per class. l2: the ridge penalty per draw. seed: the draws' seed.
  """
  x = np.asarray(features, np.float64)
  y = np.asarray(labels)
  classes = int(y.max()) + 1
  means = np.stack([x[y == c].mean(0) for c in range(classes)])
  center = means.mean(0)
  rng = np.random.default_rng(seed)
  support, target = [], []
  for c in range(classes):
    members = np.flatnonzero(y == c)
    if len(members) < shots:
      raise ValueError(f"class {c} has {len(members)} images, fewer than {shots} shots")
    for _ in range(draws):
      support.append(x[rng.choice(members, shots, replace=False)].mean(0))
      target.append(means[c])
  m = np.stack(support) - center
  t = np.stack(target) - center
  gram = m.T @ m + float(l2) * len(m) * np.eye(m.shape[1])
  matrix = np.linalg.solve(gram, m.T @ t)
  return LinearShrinkage(jnp.asarray(center, jnp.float32), jnp.asarray(matrix, jnp.float32))


def refine_with_queries(protos, support, labels, query, steps: int = 1, scale: float = 10.0):
  """Transductive prototypes: `steps` rounds of soft k-means over the unlabelled queries.

  Each round assigns every query [Q, D] to the classes by the softmax of its 10 x cosine
  logits against the current prototypes [N, D], and sets each prototype to the mean of its
  support images and its queries weighted by those assignments, all on unit-norm features
  (the classifier reads directions only). It reads the episode's queries, so it changes the
  setting from inductive to transductive.
  """
  n = protos.shape[0]
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  onehot = jax.nn.one_hot(labels, n, dtype=jnp.float32)  # [S, N]
  sums, counts = onehot.T @ unit(support), onehot.sum(0)
  q = unit(query)

  def one(p, _):
    r = jax.nn.softmax(cosine_logits(query, p, scale), axis=-1)  # [Q, N]
    return (sums + r.T @ q) / (counts + r.sum(0))[:, None], None

  return jax.lax.scan(one, protos, None, length=steps)[0]
