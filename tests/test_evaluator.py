"""The episodic evaluator: which episodes, padding and trimming, one compilation, trees."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import evaluator, mesh
from metadiff_jax.data import episodes


def _sampler(ways=3, shots=2, queries=2):
  labels = np.repeat(np.arange(6), 5)
  return episodes.EpisodeSampler(labels, ways, shots, queries, seed=3, split="test")


@jax.jit
def _per_episode(support, query, index):
  return {"index": index, "support": support, "sum": jnp.sum(query, axis=-1)}


def test_episode_i_is_the_samplers_episode_i_padded_and_trimmed():
  sampler = _sampler()
  _per_episode.clear_cache()
  seen = []

  def fn(e):
    seen.append(e.index.shape[0])
    return _per_episode(e.support, e.query, e.index)

  out = evaluator.evaluate_episodes(fn, sampler, 7, 3)
  want = sampler.batch(0, 7)
  # Batches of 3 (one device): 0-2, 3-5, 6-8 with episodes 7 and 8 dropped.
  assert seen == [3, 3, 3]
  assert _per_episode._cache_size() == 1  # the last batch is full size: one compilation
  np.testing.assert_array_equal(out["index"], np.arange(7))
  assert out["index"].dtype == np.int32
  np.testing.assert_array_equal(out["support"], want.support)
  np.testing.assert_array_equal(out["sum"], want.query.sum(-1))


def test_a_batch_larger_than_count_and_a_bare_array():
  sampler = _sampler()
  out = evaluator.evaluate_episodes(lambda e: e.classes * 1, sampler, 2, 64)
  np.testing.assert_array_equal(out, sampler.batch(0, 2).classes)


def test_no_episodes_is_an_error():
  with pytest.raises(ValueError, match="at least one episode"):
    evaluator.evaluate_episodes(lambda e: e.index, _sampler(), 0, 4)


def test_sharded_episodes_are_the_samplers_over_the_mesh():
  sampler = _sampler()
  eps = evaluator.sharded_episodes(sampler, 5, mesh.padded_size(4))
  want = sampler.batch(5, mesh.padded_size(4))
  for field in episodes.Episodes._fields:
    np.testing.assert_array_equal(mesh.to_host(getattr(eps, field)), getattr(want, field))
  assert eps.support.sharding.is_equivalent_to(mesh.sharded(), 2)


def test_class_mean_accuracy_against_a_numpy_loop():
  rng = np.random.default_rng(0)
  sampler = _sampler(ways=3, shots=2, queries=3)
  feats = rng.normal(size=(30, 8)).astype(np.float32) + np.repeat(np.eye(6, 8), 5, 0) * 2
  acc = evaluator.class_mean_accuracy(mesh.replicate(feats), sampler, 5, 2)
  eps = sampler.batch(0, 5)
  for b in range(5):
    support, query = feats[eps.support[b]], feats[eps.query[b]]
    protos = np.stack([support[eps.support_labels[b] == k].mean(0) for k in range(3)])
    cos = (query / np.linalg.norm(query, axis=-1, keepdims=True)) @ (
        protos / np.linalg.norm(protos, axis=-1, keepdims=True)).T
    assert acc[b] == pytest.approx(np.mean(cos.argmax(-1) == eps.query_labels[b]))
