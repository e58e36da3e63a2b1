import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import prototypes


def random_episode(seed, num_classes, shots, dim):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(num_classes), shots)).astype(np.int32)
  support = rng.standard_normal((num_classes * shots, dim)).astype(np.float32)
  w = rng.standard_normal((num_classes, dim)).astype(np.float32)
  return jnp.asarray(w), jnp.asarray(support), jnp.asarray(labels)


def loop_class_sums(features, labels, num_classes):
  sums = np.zeros((num_classes, features.shape[1]), np.float64)
  for f, y in zip(np.asarray(features), np.asarray(labels)):
    sums[y] += f
  return sums


def test_class_statistics_against_a_loop_with_an_empty_class():
  rng = np.random.default_rng(0)
  labels = np.array([0, 2, 2, 0, 3, 2], np.int32)  # class 1 (and 4) empty
  features = rng.standard_normal((6, 7)).astype(np.float32)
  sums = loop_class_sums(features, labels, 5)
  counts = np.bincount(labels, minlength=5)
  np.testing.assert_allclose(prototypes.class_sums(features, labels, 5), sums, rtol=1e-6)
  np.testing.assert_array_equal(prototypes.class_counts(labels, 5), counts)
  means = np.asarray(prototypes.class_means(features, labels, 5))
  np.testing.assert_allclose(means[[0, 2, 3]], sums[[0, 2, 3]] / counts[[0, 2, 3], None],
                             rtol=1e-6)
  np.testing.assert_array_equal(means[[1, 4]], 0.0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_support_loss_against_a_loop(reduction):
  w, support, labels = random_episode(1, 5, 3, 16)
  total = sum(np.sum((np.asarray(w)[y] - f) ** 2) for f, y in zip(support, labels))
  expected = total if reduction == "sum" else total / support.shape[0]
  np.testing.assert_allclose(prototypes.support_loss(w, support, labels, reduction), expected,
                             rtol=1e-5)


@pytest.mark.parametrize("num_classes", [2, 5, 10])
@pytest.mark.parametrize("dim", [64, 512])
@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_closed_form_gradient_equals_autodiff(num_classes, dim, shots, reduction):
  w, support, labels = random_episode(num_classes * dim + shots, num_classes, shots, dim)
  closed = prototypes.support_loss_grad(w, support, labels, reduction)
  auto = jax.grad(prototypes.support_loss)(w, support, labels, reduction)
  np.testing.assert_allclose(closed, auto, rtol=1e-5, atol=1e-5)


def test_gradient_of_an_empty_class_is_zero():
  w, support, labels = random_episode(2, 3, 2, 8)
  labels = jnp.where(labels == 1, 0, labels)  # class 1 has no example left
  grad = prototypes.support_loss_grad(w, support, labels)
  np.testing.assert_array_equal(grad[1], 0.0)
  np.testing.assert_allclose(grad, jax.grad(prototypes.support_loss)(w, support, labels),
                             rtol=1e-5, atol=1e-5)


def test_out_of_range_labels_raise_on_host_and_poison_under_jit():
  w, support, labels = random_episode(3, 5, 1, 8)
  bad = labels.at[0].set(5)
  with pytest.raises(ValueError, match=r"support_labels.*\[0, 5\)"):
    prototypes.check_labels(bad, 5)
  stats = jax.jit(prototypes.support_stats, static_argnums=2)(support, bad, 5)
  assert np.all(np.isnan(stats.sums)) and np.all(np.isnan(stats.counts))
  good = jax.jit(prototypes.support_stats, static_argnums=2)(support, labels, 5)
  assert np.all(np.isfinite(good.sums))


@pytest.mark.parametrize("support, labels, match", [
    (np.zeros((4,)), np.zeros((4,), np.int32), r"`support` must be \[S, D\]"),
    (np.zeros((4, 3)), np.zeros((5,), np.int32), "support_labels"),
    (np.zeros((4, 3)), np.zeros((4,), np.float32), "integers"),
])
def test_bad_episode_arguments(support, labels, match):
  with pytest.raises((ValueError, TypeError), match=match):
    prototypes.support_stats(support, labels, 3)


def test_cosine_logits():
  rng = np.random.default_rng(4)
  query, protos = rng.standard_normal((7, 12)), rng.standard_normal((3, 12))
  qn = query / np.linalg.norm(query, axis=1, keepdims=True)
  pn = protos / np.linalg.norm(protos, axis=1, keepdims=True)
  np.testing.assert_allclose(prototypes.cosine_logits(query, protos), 10 * qn @ pn.T, rtol=1e-5)
  np.testing.assert_allclose(prototypes.cosine_logits(query, protos, scale=2.0), 2 * qn @ pn.T,
                             rtol=1e-5)
  batched = prototypes.cosine_logits(np.stack([query, query]), np.stack([protos, -protos]))
  np.testing.assert_allclose(batched[1], -10 * qn @ pn.T, rtol=1e-5, atol=1e-6)
  zero = prototypes.cosine_logits(query, np.zeros((3, 12)))
  np.testing.assert_array_equal(zero, 0.0)


def test_euclidean_logits():
  rng = np.random.default_rng(5)
  query, protos = rng.standard_normal((7, 12)), rng.standard_normal((3, 12))
  expected = -((query[:, None] - protos[None]) ** 2).sum(-1)
  np.testing.assert_allclose(prototypes.euclidean_logits(query, protos), expected, rtol=1e-5)


def _gaussian_classes(seed, classes, per, dim, between, within):
  rng = np.random.default_rng(seed)
  centres = 3.0 + between * rng.normal(size=(classes, dim))
  x = centres[:, None] + within * rng.normal(size=(classes, per, dim))
  return x.reshape(-1, dim), np.repeat(np.arange(classes), per), centres


@pytest.mark.parametrize("shots", [1, 4])
def test_linear_shrinkage_is_the_gaussian_posterior_mean(shots):
  """Classes N(c, w^2 I) with centres c ~ N(m, b^2 I): the best linear estimate of a class's
  mean from K of its images shrinks them toward m by b^2 / (b^2 + w^2 / K). The fit on base
  classes finds that map (up to the finite draws), and on held-out classes its prototypes
  are nearer the true means than the support means are."""
  between, within, dim = 1.0, 1.5, 6
  x, y, _ = _gaussian_classes(0, 400, 40, dim, between, within)
  fit = prototypes.fit_linear_shrinkage(x, y, shots, draws=10, l2=1e-6, seed=0)
  # The target is each class's mean over its 40 images, itself within^2 / 40 from the centre.
  target_var = between ** 2 + within ** 2 / 40
  want = target_var / (between ** 2 + within ** 2 / shots)
  matrix = np.asarray(fit.matrix)
  np.testing.assert_allclose(np.diag(matrix), want, atol=0.08)
  assert np.abs(matrix - np.diag(np.diag(matrix))).max() < 0.08
  np.testing.assert_allclose(np.asarray(fit.center), 3.0, atol=0.2)
  xt, yt, centres = _gaussian_classes(1, 200, shots, dim, between, within)
  means = xt.reshape(200, shots, dim).mean(1)
  shrunk = np.asarray(fit(jnp.asarray(means, jnp.float32)))
  assert np.mean((shrunk - centres) ** 2) < 0.9 * np.mean((means - centres) ** 2)


def test_linear_shrinkage_refuses_classes_smaller_than_the_shots():
  x, y, _ = _gaussian_classes(0, 5, 3, 4, 1.0, 1.0)
  with pytest.raises(ValueError, match="fewer than 5 shots"):
    prototypes.fit_linear_shrinkage(x, y, 5, draws=2, l2=1e-3)


def test_refining_with_queries_moves_prototypes_toward_the_query_clusters():
  """One soft k-means round over well-clustered queries pulls 1-shot prototypes, drawn far
  from their class centres, toward them (in direction: the classifier reads cosines)."""
  rng = np.random.default_rng(3)
  ways, dim, queries = 4, 16, 30
  centres = np.eye(ways, dim) * 5 + 1.0
  support = centres + 2.0 * rng.normal(size=(ways, dim))
  query = np.repeat(centres, queries, axis=0) + 0.3 * rng.normal(size=(ways * queries, dim))
  labels = jnp.arange(ways)
  protos = jnp.asarray(support, jnp.float32)
  refined = prototypes.refine_with_queries(protos, jnp.asarray(support, jnp.float32), labels,
                                           jnp.asarray(query, jnp.float32), steps=1)
  cos = lambda a, b: np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert np.all(cos(np.asarray(refined), centres) > cos(support, centres))
  unchanged = prototypes.refine_with_queries(protos, protos, labels,
                                             jnp.asarray(query, jnp.float32), steps=0)
  np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(protos))
