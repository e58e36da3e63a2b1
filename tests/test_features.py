"""The feature cache: embedding in fixed batches, keyed reuse, recomputation, gathering."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax.data import episodes, features, load
from metadiff_jax.data.errors import DataError

TRACES = collections.Counter()


def linear_backbone(variables, images):
  """uint8 [b, 4, 4, 1] -> [b, 3]: a stand-in backbone with preprocessing inside."""
  TRACES["backbone"] += 1
  x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255
  return x @ variables["w"]


def _split(n=23, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
  labels = (np.arange(n) % classes).astype(np.int32)
  return load.SplitArrays(images, labels, tuple(f"c{i}" for i in range(classes)), "dsfp")


def _variables(seed=0):
  return {"w": np.random.default_rng(seed).normal(size=(16, 3)).astype(np.float32)}


def test_embed_matches_direct_apply_and_compiles_once():
  split, variables = _split(), _variables()
  TRACES.clear()
  out = features.embed(linear_backbone, variables, split.images, batch_size=5, progress=False)
  want = split.images.reshape(23, -1) / 255 @ variables["w"]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert out.shape == (23, 3) and out.dtype == np.float32
  assert TRACES["backbone"] == 1  # the padded last batch reuses the compiled function


def test_cache_is_reused_and_keyed_on_backbone_and_dataset(tmp_path):
  split, variables = _split(), _variables()
  calls = collections.Counter()

  def apply_fn(v, x):
    calls["apply"] += 1
    return linear_backbone(v, x)

  a = features.split_features(str(tmp_path), split, "train", apply_fn, variables,
                              batch_size=8, progress=False)
  n_calls = calls["apply"]
  b = features.split_features(str(tmp_path), split, "train", apply_fn, variables,
                              batch_size=8, progress=False)
  assert calls["apply"] == n_calls  # second call read the cache
  np.testing.assert_array_equal(a.features, b.features)
  np.testing.assert_array_equal(b.labels, split.labels)
  assert b.num_classes == 4
  # Another backbone, dataset build or split gets its own file.
  other = features.split_features(str(tmp_path), split, "train", apply_fn, _variables(1),
                                  batch_size=8, progress=False)
  assert other.key != a.key and not np.allclose(other.features, a.features)
  moved = load.SplitArrays(split.images, split.labels, split.class_names, "otherfp")
  assert features.split_features(str(tmp_path), moved, "train", apply_fn, variables,
                                 progress=False).key != a.key
  assert len(os.listdir(tmp_path / "features")) == 3


def test_damaged_cache_is_recomputed_not_trusted(tmp_path):
  split, variables = _split(), _variables()
  a = features.split_features(str(tmp_path), split, "val", linear_backbone, variables,
                              progress=False)
  path = tmp_path / "features" / f"{a.key}.npz"
  path.write_bytes(path.read_bytes()[:50])  # truncated, e.g. by a full disk
  b = features.split_features(str(tmp_path), split, "val", linear_backbone, variables,
                              progress=False)
  np.testing.assert_array_equal(a.features, b.features)
  with np.load(path) as f:  # and the file is whole again
    assert f["features"].shape == (23, 3)


def test_non_finite_features_are_refused(tmp_path):
  split = _split()
  bad = {"w": np.full((16, 3), np.nan, np.float32)}
  with pytest.raises(DataError, match="NaN or infinite features"):
    features.split_features(str(tmp_path), split, "test", linear_backbone, bad, progress=False)
  assert not (tmp_path / "features").exists() or not os.listdir(tmp_path / "features")


def test_variables_fingerprint_sees_every_leaf():
  v = {"a": np.zeros(3, np.float32), "b": {"c": np.ones((2, 2), np.float32)}}
  fp = features.variables_fingerprint(v)
  assert fp == features.variables_fingerprint(jax.tree.map(np.copy, v))
  w = jax.tree.map(np.copy, v)
  w["b"]["c"][1, 1] = 2
  assert features.variables_fingerprint(w) != fp
  assert features.variables_fingerprint({"a": v["a"].astype(np.float16), "b": v["b"]}) != fp


def test_gather_and_class_means():
  feats = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
  labels = np.arange(30) % 6
  ep = episodes.EpisodeSampler(labels, 3, 2, 1, seed=0, split="train").batch(0, 5)
  support, query = features.gather(jnp.asarray(feats), ep.support, ep.query)
  assert support.shape == (5, 6, 4) and query.shape == (5, 3, 4)
  np.testing.assert_array_equal(np.asarray(support), feats[ep.support])
  np.testing.assert_array_equal(np.asarray(query), feats[ep.query])
  means = np.asarray(features.class_means(feats, labels, 6))
  for c in range(6):
    np.testing.assert_allclose(means[c], feats[labels == c].mean(0), rtol=1e-5, atol=1e-6)
