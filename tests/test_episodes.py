"""The episode sampler: purity in (seed, split, index), sharding, relabelling, refusals."""

import numpy as np
import pytest

from metadiff_jax.data import episodes
from metadiff_jax.data.errors import DataError


def _labels(num_classes=12, per_class=(8, 9, 10), seed=0):
  rng = np.random.default_rng(seed)
  counts = [per_class[c % len(per_class)] for c in range(num_classes)]
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
  return rng.permutation(labels)  # images of a class need not be contiguous


def test_episode_is_pure_function_of_seed_split_index():
  labels = _labels()
  a = episodes.EpisodeSampler(labels, 5, 2, 3, seed=7, split="test")
  b = episodes.EpisodeSampler(labels, 5, 2, 3, seed=7, split="test")
  batch = a.batch(10, 6)
  for j in range(6):  # episode 10 + j alone equals its row in the batch
    one = b.episode(10 + j)
    for field in episodes.Episodes._fields:
      np.testing.assert_array_equal(getattr(one, field)[0], getattr(batch, field)[j])
  # Batch boundaries do not matter: 2 batches of 3 == 1 batch of 6.
  two = episodes.concat([b.batch(10, 3), b.batch(13, 3)])
  for x, y in zip(two, batch):
    np.testing.assert_array_equal(x, y)


def test_seed_and_split_change_the_episodes():
  labels = _labels()
  base = episodes.EpisodeSampler(labels, 5, 1, 5, seed=0, split="test").batch(0, 4)
  other_seed = episodes.EpisodeSampler(labels, 5, 1, 5, seed=1, split="test").batch(0, 4)
  other_split = episodes.EpisodeSampler(labels, 5, 1, 5, seed=0, split="val").batch(0, 4)
  assert not np.array_equal(base.support, other_seed.support)
  assert not np.array_equal(base.support, other_split.support)


def test_known_episode_is_stable_across_versions():
  # Pins the random stream: a change here changes every published evaluation episode.
  labels = np.repeat(np.arange(6), 4)
  ep = episodes.EpisodeSampler(labels, 3, 1, 1, seed=0, split="test").episode(0)
  again = episodes.EpisodeSampler(labels, 3, 1, 1, seed=0, split="test").episode(0)
  np.testing.assert_array_equal(ep.support, again.support)
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [0, __import__("zlib").crc32(b"test"), 0])))
  classes = rng.choice(6, size=3, replace=False)
  np.testing.assert_array_equal(ep.classes[0], classes)
  for j, c in enumerate(classes):
    picks = rng.choice(4, size=2, replace=False)
    assert ep.support[0, j] == 4 * c + picks[0]
    assert ep.query[0, j] == 4 * c + picks[1]


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 15), (5, 5, 3), (3, 2, 0), (12, 1, 1)])
def test_episode_contents(ways, shots, queries):
  labels = _labels(num_classes=12, per_class=(16, 17, 20))
  sampler = episodes.EpisodeSampler(labels, ways, shots, queries, seed=3, split="train")
  ep = sampler.batch(0, 20)
  assert ep.support.shape == (20, ways * shots) and ep.query.shape == (20, ways * queries)
  assert ep.support.dtype == np.int32 and ep.classes.shape == (20, ways)
  np.testing.assert_array_equal(ep.support_labels[0], np.repeat(np.arange(ways), shots))
  np.testing.assert_array_equal(ep.query_labels[0], np.repeat(np.arange(ways), queries))
  for b in range(20):
    assert len(set(ep.classes[b])) == ways  # distinct classes
    both = np.concatenate([ep.support[b], ep.query[b]])
    assert len(set(both)) == len(both)  # no image twice in an episode
    # Relabelling: every image's split label is the class its episode label names.
    np.testing.assert_array_equal(labels[ep.support[b]], ep.classes[b][ep.support_labels[b]])
    np.testing.assert_array_equal(labels[ep.query[b]], ep.classes[b][ep.query_labels[b]])


def test_episodes_cover_classes_roughly_uniformly():
  labels = _labels(num_classes=10, per_class=(10,))
  ep = episodes.EpisodeSampler(labels, 5, 1, 1, seed=0, split="train").batch(0, 2000)
  counts = np.bincount(ep.classes.ravel(), minlength=10)
  assert counts.min() > 0.85 * 1000 and counts.max() < 1.15 * 1000  # expected 1000 each


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_shards_union_equals_single_process(processes):
  sampler = episodes.EpisodeSampler(_labels(), 5, 1, 2, seed=5, split="train")
  for step in (0, 3):
    whole = sampler.shard(step, 16)
    parts = episodes.concat([sampler.shard(step, 16, p, processes) for p in range(processes)])
    for x, y in zip(whole, parts):
      np.testing.assert_array_equal(x, y)


def test_impossible_requests_are_refused_with_numbers():
  labels = _labels(num_classes=4, per_class=(6, 7))
  with pytest.raises(DataError, match="5-way episodes need 5 classes but split 'test' has 4"):
    episodes.EpisodeSampler(labels, 5, 1, 1, seed=0, split="test")
  with pytest.raises(DataError, match="need 7 images per class .* only 6"):
    episodes.EpisodeSampler(labels, 2, 5, 2, seed=0, split="test")
  with pytest.raises(DataError, match="shots must be an integer >= 1"):
    episodes.EpisodeSampler(labels, 2, 0, 2, seed=0, split="test")
  with pytest.raises(DataError, match="no images"):
    episodes.EpisodeSampler(np.array([0, 0, 2, 2]), 2, 1, 0, seed=0, split="test")
  sampler = episodes.EpisodeSampler(labels, 2, 1, 1, seed=0, split="test")
  with pytest.raises(DataError, match="multiple of 3"):
    sampler.shard(0, 16, 0, 3)


def test_pinned_episodes_never_change():
  # Values recorded when the sampler was written: evaluation episodes must stay the same
  # across releases, machines and NumPy versions (SeedSequence and PCG64 are stable streams).
  labels = np.repeat(np.arange(10), 7)
  ep = episodes.EpisodeSampler(labels, 3, 2, 1, seed=42, split="test").batch(5, 2)
  assert ep.classes.tolist() == [[1, 4, 3], [1, 0, 4]]
  assert ep.support.tolist() == [[7, 8, 32, 30, 25, 21], [9, 12, 5, 6, 33, 34]]
  assert ep.query.tolist() == [[10, 28, 26], [8, 3, 31]]


# ----------------------------------------------------------------------------- on device

def draw_many(table, key, start, count, ways, shots):
  import jax
  import jax.numpy as jnp
  draw = jax.jit(jax.vmap(episodes.draw_support, (None, None, 0, None, None)),
                 static_argnums=(3, 4))
  idx, cls = draw(table, key, jnp.arange(start, start + count), ways, shots)
  return np.asarray(idx), np.asarray(cls)


def test_device_support_sets_are_valid_episodes():
  import jax
  counts = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
  labels = np.repeat(np.arange(10), counts)
  table = episodes.class_table(labels)
  assert table.members.shape == (10, 12)
  idx, cls = draw_many(table, jax.random.key(0), 0, 2000, 5, 3)
  assert idx.shape == (2000, 15) and cls.shape == (2000, 5)
  # N distinct classes, K distinct images of each, class-major, labels of the right class.
  assert all(len(set(c)) == 5 for c in cls)
  assert all(len(set(i)) == 15 for i in idx)
  np.testing.assert_array_equal(labels[idx].reshape(2000, 5, 3), np.repeat(cls[:, :, None], 3, 2))
  # Every class is drawn about equally often, and within a class every image too.
  class_freq = np.bincount(cls.ravel(), minlength=10) / cls.size
  np.testing.assert_allclose(class_freq, 0.1, atol=0.015)
  image_freq = np.bincount(idx.ravel(), minlength=len(labels))
  for c in (0, 9):  # the smallest class has every image each time; the largest, 3 of 12
    members = np.flatnonzero(labels == c)
    per_image = image_freq[members] / np.sum(cls == c)
    np.testing.assert_allclose(per_image, 3 / counts[c], atol=0.08)


def test_device_episodes_are_a_function_of_the_index_alone():
  import jax
  table = episodes.class_table(np.repeat(np.arange(8), 6))
  key = jax.random.key(5)
  whole = draw_many(table, key, 0, 40, 4, 2)
  part = draw_many(table, key, 25, 10, 4, 2)
  for a, b in zip(whole, part):
    np.testing.assert_array_equal(a[25:35], b)
  other = draw_many(table, jax.random.key(6), 0, 40, 4, 2)
  assert not np.array_equal(whole[0], other[0])


def test_impossible_device_episodes_are_refused():
  table = episodes.class_table(np.repeat(np.arange(4), [5, 5, 2, 5]))
  with pytest.raises(DataError, match="5-way episodes need 5 classes"):
    episodes.check_support_episodes(table, 5, 1, "train")
  with pytest.raises(DataError, match="a class with only 2"):
    episodes.check_support_episodes(table, 3, 3, "train")
  with pytest.raises(DataError, match="have no images"):
    episodes.class_table(np.array([0, 0, 2, 2]))
