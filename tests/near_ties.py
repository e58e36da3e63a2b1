"""Comparing accuracies of two computations whose scores agree only up to rounding.

Two implementations (XLA and numpy, one compiled program and another) or two runs whose
weights differ in the last bits compute each query's class scores with slightly different
errors. A query's predicted class can change only if the margin between its two highest
scores is at most the sum of the two scores' errors, so two accuracies may differ by at most
the fraction of queries whose margin is below that bound: the near-ties. The tests compare
accuracies through `assert_within_near_ties` with a tolerance derived here, never with
exact equality or an arbitrary `approx`, which a near-tie can flip.
"""

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 2^-23: twice float32's unit roundoff

# How far apart (relative to each row's norm) the weights are that two compiled programs of
# the same float32 sampler produce: the eval stage's and the trajectory's (which keeps the
# intermediate steps). Each program rounds every step's sums in its own order; with the tests'
# short schedules they agree to about 1e-6, and
# test_analysis.test_trajectory_last_point_is_the_sampler_output asserts this bound.
SAMPLER_ROUNDING = 1e-4


def cosine_rounding_tolerance(dim: int, shots: int, scale: float = 10.0) -> float:
  """The top-two margin below which float32 rounding can flip a cosine classifier's choice.

  One float32 evaluation of scale x cos(q, p) from the same float32 inputs, with p the mean
  of `shots` support features, has an error of at most scale x (dim + shots + 3) x eps: the
  dot product of `dim` terms contributes dim x u (u = eps / 2), each normalisation about
  (dim / 2 + 2) u, the class mean shots x u relative to its norm (the features are
  non-negative, so the mean does not cancel), the scale one u. Two such evaluations (XLA's
  and numpy's, or two compiled programs) differ by at most twice that per score, and a flip
  between two classes needs the margin to be at most the sum over both classes:

      tol = 4 x scale x (dim + shots + 3) x eps

  (2.9e-4 for the 10 x cosine of 64-dimensional features, 1 shot).
  """
  return 4.0 * scale * (dim + shots + 3) * F32_EPS


def cosine_perturbation_tolerance(rel_query, rel_prototypes, scale: float = 10.0):
  """The top-two margin below which moving the vectors can flip a cosine classifier's choice.

  Moving a vector x by e with ||e|| <= r ||x|| (r < 1) turns it by at most asin(r) <= pi r / 2,
  and cos is 1-Lipschitz in the angle, so a query moved by `rel_query` and a prototype by
  `rel_prototypes` (relative norms) change scale x cos by at most scale pi (r_q + r_p) / 2;
  a flip between two classes needs the margin to be at most twice that:

      tol = scale x pi x (rel_query + rel_prototypes)
  """
  return scale * np.pi * (np.asarray(rel_query) + np.asarray(rel_prototypes))


def cosine_scores(query, prototypes, scale: float = 10.0) -> np.ndarray:
  """scale x cos in float64: query [..., Q, D], prototypes [..., N, D] -> [..., Q, N]."""
  q = np.asarray(query, np.float64)
  p = np.asarray(prototypes, np.float64)
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  p = p / np.linalg.norm(p, axis=-1, keepdims=True)
  return scale * np.einsum("...qd,...nd->...qn", q, p)


def margins(scores) -> np.ndarray:
  """[..., Q] the gap between each query's highest and second-highest score."""
  top2 = np.sort(np.asarray(scores, np.float64), axis=-1)[..., -2:]
  return top2[..., 1] - top2[..., 0]


def relative_errors(a, b) -> np.ndarray:
  """[...] ||a - b|| / ||b|| over the last axis."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def assert_within_near_ties(got: dict, want: dict, near, what: str = "") -> None:
  """Two `metrics.summarize` rows of the same episodes differ by at most their near-ties.

  Args:
    got, want: {"mean", "ci95", "n"} rows (the accuracy over n episodes of Q queries).
    near: [n, Q] bool: the queries whose prediction may differ between the two (their
      margin is below the tolerance).
    what: a label for the failure message.

  A flipped query moves its episode's accuracy by 1 / Q, so the episode accuracies differ by
  d_e <= near_e / Q, the mean by at most mean(d), and the population std (a norm of the
  centred accuracies, 1-Lipschitz in the l2 norm over sqrt(n)) by at most ||d|| / sqrt(n);
  ci95 = 1.96 std / sqrt(n). With no near-tie the rows are equal.
  """
  near = np.asarray(near, bool)
  n, queries = near.shape
  assert got["n"] == want["n"] == n, (what, got["n"], want["n"], n)
  d = near.sum(1) / queries
  slack = 1e-12  # the float64 sums of `summarize` themselves
  assert abs(got["mean"] - want["mean"]) <= d.mean() + slack, (
      f"{what}: mean accuracy {got['mean']} vs {want['mean']}, but only {int(near.sum())} of "
      f"{near.size} queries are near-ties")
  ci_bound = 1.96 * np.linalg.norm(d) / n
  assert abs(got["ci95"] - want["ci95"]) <= ci_bound + slack, (
      f"{what}: ci95 {got['ci95']} vs {want['ci95']}, bound {ci_bound}")


def linear_perturbation_tolerance(weights, query, rel_weights):
  """[..., Q] the top-two margin below which moving a linear head's rows can flip its choice.

  Logits are W f + b with rows w_k = [W_k, b_k] [..., N, D + 1] and queries [..., Q, D]; a row
  moved by at most `rel_weights` of its norm changes a logit by at most
  rel ||w_k|| ||[f, 1]|| (Cauchy-Schwarz), and a flip needs twice the largest such change.
  """
  w = np.asarray(weights, np.float64)
  q = np.asarray(query, np.float64)
  row = np.linalg.norm(w, axis=-1).max(-1)[..., None]  # [..., 1]
  f = np.sqrt(np.sum(q * q, axis=-1) + 1.0)  # [..., Q]
  return 2.0 * rel_weights * row * f


def assert_accuracy_within_near_ties(got, want, near) -> None:
  """Per-episode accuracies [E] of the same queries differ by at most each episode's
  near-ties: [E, Q] bool."""
  near = np.asarray(near, bool)
  bound = near.sum(-1) / near.shape[-1]
  diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  assert np.all(diff <= bound + 1e-6), (
      f"accuracies {np.asarray(got)} vs {np.asarray(want)} differ beyond the near-ties "
      f"{near.sum(-1)} of {near.shape[-1]} queries")
