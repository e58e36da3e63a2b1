"""The TCUNet variants of Tables 3 and 4: the cross-entropy gradient, no UNet, the linear head.

Each variant's network against its formula written out in numpy, its sampler against a loop of
`__call__` and `reverse_step`, the linear head's diffusion targets inside `train_steps` against
a direct fit, a short training run of the trainable variants, the eval metrics of the linear
head, and the config checks. Tiny sizes throughout (D = 12, T = 6).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import near_ties
from metadiff_jax import (checks, config_lib, diffusion, diffusion_training, heads, method,
                          prototypes, schedule, tcunet)
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import episodes
from metadiff_jax.errors import ConfigError

D, WAYS, SHOTS, T = 12, 3, 2, 6
# (head, gradient, unet): every variant but the default, which tests/test_tcunet.py covers.
VARIANTS = [("prototype", "cosine_ce", True), ("linear", "l2", True),
            ("prototype", "l2", False), ("prototype", "cosine_ce", False),
            ("linear", "l2", False)]


def make_model(head="prototype", gradient="l2", unet=True, **kw):
  return tcunet.TCUNet(feature_dim=heads.weight_dim(head, D), hidden_dims=(8, 4),
                       time_embed_dim=8, head=head, gradient=gradient, unet=unet, **kw)


def make_episodes(batch, seed=0):
  """w_T [B, N, W] for both widths, support [B, N*K, D] (ReLU-like), labels [B, N*K]."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((batch, WAYS, D + 1)).astype(np.float32)
  support = np.maximum(rng.standard_normal((batch, WAYS * SHOTS, D)) + 0.5, 0).astype(np.float32)
  labels = np.stack([rng.permutation(np.repeat(np.arange(WAYS), SHOTS)) for _ in range(batch)])
  return jnp.asarray(w), jnp.asarray(support), jnp.asarray(labels, jnp.int32)


def init(model, support, labels, seed=0):
  w = jnp.zeros((WAYS, model.feature_dim))
  return model.init(jax.random.key(seed), w, 0, support[0], labels[0])


def gradient_of(head, gradient, w, support, labels):
  """The gradient the variant feeds the network, straight from `heads`."""
  if head == "linear":
    return heads.support_grad("linear", w, support, labels)
  if gradient == "cosine_ce":
    return heads.cosine_ce_grad(w, support, labels)
  return heads.support_grad("prototype", w, support, labels)


def explicit_eps(params, g, t, embed_dim=8):
  """Section 4.3's network written out in float64 numpy, from the gradient g [N, W]."""
  half = embed_dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  e = np.concatenate([np.cos(t * freqs), np.sin(t * freqs)])
  dense = lambda name, x: (x @ np.asarray(params[name]["kernel"], np.float64)
                           + np.asarray(params[name]["bias"], np.float64))
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  softplus = lambda x: np.log1p(np.exp(x))
  gate = sigmoid(dense("time_scale_2", np.maximum(dense("time_scale_0", e), 0)))
  scale = [dense(f"time_emb{b}", e) for b in range(1, 6)]
  g = np.asarray(g, np.float64)
  x1 = softplus(dense("proto_inf1", g) * scale[0])
  x2 = softplus(dense("proto_inf2", x1) * scale[1])
  x3 = softplus(dense("proto_inf3", x2) * scale[2]) + x2
  x4 = softplus(dense("proto_inf4", x3) * scale[3]) + x1
  x5 = dense("proto_inf5", x4) * scale[4] + g
  return gate * g + (1 - gate) * x5


@pytest.mark.parametrize("head, gradient, unet", VARIANTS)
def test_each_variant_is_its_formula(head, gradient, unet):
  model = make_model(head, gradient, unet)
  w_all, support, labels = make_episodes(1)
  w, support, labels = w_all[0, :, :model.feature_dim], support[0], labels[0]
  variables = init(model, support[None], labels[None], seed=1)
  g = gradient_of(head, gradient, w, support, labels)
  eps = model.apply(variables, w, 4, support, labels)
  assert eps.shape == w.shape
  if unet:
    # The parameter names and shapes of the default network, rows of width W.
    assert variables["params"]["proto_inf5"]["kernel"].shape == (8, model.feature_dim)
    np.testing.assert_allclose(eps, explicit_eps(variables["params"], g, 4), rtol=1e-4,
                               atol=1e-5)
  else:
    assert not jax.tree_util.tree_leaves(variables)
    np.testing.assert_array_equal(eps, g)  # eps = g exactly
  # Out-of-range labels under a trace poison the episode instead of clamping.
  bad = jax.jit(model.apply)(variables, w, 4, support, labels.at[0].set(WAYS))
  assert np.all(np.isnan(bad))


def test_the_gradient_feeds_the_network_where_the_default_feeds_eq_11():
  # The same parameters in the default and the cosine_ce network: only g differs.
  model = make_model()
  w_all, support, labels = make_episodes(1)
  w, support, labels = w_all[0, :, :D], support[0], labels[0]
  variables = init(model, support[None], labels[None])
  ce = model.clone(gradient="cosine_ce")
  g = heads.cosine_ce_grad(w, support, labels)
  np.testing.assert_array_equal(ce.apply(variables, w, 2, support, labels),
                                model.apply(variables, g, 2, method="from_gradient"))
  assert not np.allclose(g, prototypes.support_loss_grad(w, support, labels))


@pytest.mark.parametrize("head, gradient, unet", VARIANTS)
def test_sampler_equals_a_loop_of_call_and_reverse_step(head, gradient, unet):
  model = make_model(head, gradient, unet)
  sched = schedule.linear(num_steps=T, beta_start=1e-2, beta_end=0.2)
  w_all, support, labels = make_episodes(2, seed=2)
  w_T = w_all[..., :model.feature_dim]
  variables = init(model, support, labels, seed=3)
  w0, trajectory = diffusion.sample_batch(model, variables, sched, w_T, support, labels,
                                          trajectory_every=2)
  apply = jax.jit(model.apply)
  for b in range(w_T.shape[0]):
    w, states = w_T[b], [w_T[b]]
    for t in reversed(range(T)):
      eps = apply(variables, w, t, support[b], labels[b])
      w = diffusion.reverse_step(sched, w, eps, t)
      states.append(w)
    np.testing.assert_allclose(w0[b], w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trajectory[b], np.stack(states[::2]), rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(w0))


def test_the_linear_head_wants_support_features_one_narrower():
  model = make_model("linear")
  w_all, support, labels = make_episodes(1)
  variables = init(model, support, labels)
  with pytest.raises(ValueError, match=r"feature dim 13.*need D = 12"):
    model.apply(variables, w_all[0], 0, jnp.ones((WAYS * SHOTS, D + 1)), labels[0])
  with pytest.raises(ValueError, match=r"rows of 12; they must be D \+ 1"):
    diffusion.sample_batch(model, variables, schedule.linear(T, 1e-2, 0.2), w_all[..., :D],
                           support, labels)
  with pytest.raises(ValueError, match="linear head is always fed"):
    make_model("linear", "cosine_ce")
  with pytest.raises(ValueError, match="unknown gradient"):
    make_model("prototype", "l1")


# ----------------------------------------------------------------------------- training

def base_split(seed=0):
  """Features [n, D] of 7 base classes of unequal sizes (3 to 9 images) and the table."""
  rng = np.random.default_rng(seed)
  counts = np.array([3, 9, 5, 4, 8, 6, 7])
  labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
  centres = rng.standard_normal((len(counts), D))
  feats = np.maximum(centres[labels] + 0.7 * rng.standard_normal((len(labels), D)), 0)
  return feats.astype(np.float32), labels.astype(np.int32), episodes.class_table(labels)


def test_the_config_builds_the_variant_and_its_state():
  config = variant_config(head="linear")
  metadiff = method.MetaDiff.from_config(config, D)
  model, _, state = metadiff.model, metadiff.train_schedule, metadiff.init(SHOTS)
  assert (model.head, model.feature_dim, model.gradient, model.unet) == ("linear", D + 1,
                                                                          "l2", True)
  assert state.params["proto_inf1"]["kernel"].shape == (D + 1, 8)
  assert method.target_function(config) == method.LinearFitTargets(7, 0.01)
  assert method.target_function(variant_config()) == method.ClassMeanTargets()
  config = variant_config(gradient="cosine_ce", unet=False, stages=("eval",))
  metadiff = method.MetaDiff.from_config(config, D)
  model, _, state = metadiff.model, metadiff.train_schedule, metadiff.init(SHOTS)
  assert model.gradient == "cosine_ce"
  assert not jax.tree_util.tree_leaves((state.params, state.ema_params))
  with pytest.raises(ConfigError, match="nothing to train"):
    diffusion_training.train_shot(config, "/nonexistent", SHOTS, None, None, None)


RECORDED = []


@dataclasses.dataclass(frozen=True)
class RecordedLinearFit(method.LinearFitTargets):
  """LinearFitTargets that also hands each step's targets and classes to the host."""

  def __call__(self, targets, features_dev, table, classes):
    w0 = super().__call__(targets, features_dev, table, classes)
    jax.debug.callback(lambda w, c: RECORDED.append((np.asarray(w), np.asarray(c))), w0,
                       classes)
    return w0


def test_linear_fit_targets_inside_train_steps_are_the_fit_on_the_class_images():
  feats, labels, table = base_split()
  config = variant_config(head="linear")
  metadiff = method.MetaDiff.from_config(config, D)
  model, sched, state = metadiff.model, metadiff.train_schedule, metadiff.init(SHOTS)
  target_fn = RecordedLinearFit(steps=25, l2=0.05)
  RECORDED.clear()
  state, losses = method.train_steps(
      model, state, sched, jnp.asarray(feats), jnp.zeros((7, D)), table, jax.random.key(1),
      jax.random.key(2), 2, 3, WAYS, SHOTS, 0.9, 1, target_fn=target_fn)
  jax.block_until_ready(losses)
  assert len(RECORDED) == 2 and RECORDED[0][0].shape == (3, WAYS, D + 1)
  fit = jax.jit(heads.fit_linear, static_argnames=("ways", "steps"))
  for w0, classes in RECORDED:
    for b in range(3):
      images = np.concatenate([feats[labels == c] for c in classes[b]])  # unequal sizes
      y = np.concatenate([np.full((labels == c).sum(), k) for k, c in enumerate(classes[b])])
      direct = fit(images, jnp.asarray(y), jnp.ones(len(y), bool), ways=WAYS, steps=25,
                   l2=0.05)
      np.testing.assert_allclose(w0[b], direct, rtol=1e-4, atol=1e-5)
  assert len({tuple(c) for _, cs in RECORDED for c in cs}) > 1  # not one episode repeated


@pytest.mark.parametrize("head, gradient", [("linear", "l2"), ("prototype", "cosine_ce")])
def test_training_a_variant_lowers_its_loss(head, gradient):
  feats, labels, table = base_split(seed=1)
  means = np.stack([feats[labels == c].mean(0) for c in range(7)])
  config = variant_config(head=head, gradient=gradient)
  # Noisier steps and a faster Adam than the paper's, so that 120 steps show a trend.
  config.diffusion.update(dict(beta_start=0.02, beta_end=0.3))
  config.train.learning_rate = 1e-2
  metadiff = method.MetaDiff.from_config(config, D)
  model, sched, state = metadiff.model, metadiff.train_schedule, metadiff.init(SHOTS)
  target_fn = method.LinearFitTargets(25, 0.05) if head == "linear" else method.ClassMeanTargets()
  losses = []
  for _ in range(3):
    state, loss = method.train_steps(
        model, state, sched, jnp.asarray(feats), jnp.asarray(means), table, jax.random.key(1),
        jax.random.key(2), 40, 8, WAYS, SHOTS, 0.9, 1, target_fn=target_fn)
    losses.append(np.asarray(loss))
  losses = np.concatenate(losses)
  assert np.all(np.isfinite(losses))
  # Measured: 1.19 -> 1.03 (linear), 1.89 -> 1.33 (cosine_ce). The cross-entropy gradients
  # carry less of w_t than Eq. 11's, so the network learns the noise more slowly from them.
  first, last = losses[:20].mean(), losses[-20:].mean()
  assert last < 0.93 * first, (first, last)


# ----------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("unet", [True, False])
def test_linear_head_eval_metrics(unet):
  rng = np.random.default_rng(4)
  split_labels = np.repeat(np.arange(5), 8).astype(np.int32)
  feats = np.maximum(rng.standard_normal((5, D))[split_labels]
                     + 0.5 * rng.standard_normal((40, D)), 0).astype(np.float32)
  sampler = episodes.EpisodeSampler(split_labels, WAYS, SHOTS, 3, 0, "test")
  model = make_model("linear", unet=unet)
  w_all, support, labels = make_episodes(1)
  variables = init(model, support, labels)
  sched = schedule.linear(T, 1e-2, 0.2)
  key = jax.random.key(5)
  m = method.run_episodes(model, variables, sched, jnp.asarray(feats), sampler, 4, 4, key,
                          progress=False, linear_fit=(30, 0.05))
  eps = sampler.batch(0, 4)
  w_T = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), (WAYS, D + 1))
                   for i in eps.index])
  support, query = jnp.asarray(feats[eps.support]), jnp.asarray(feats[eps.query])
  w0 = diffusion.sample_batch(model, variables, sched, w_T, support,
                              jnp.asarray(eps.support_labels))
  # w0 sampled here and inside episode_metrics' program agrees only to rounding (the norm
  # ratios below to 1e-4): the accuracies agree up to queries whose two best logits are
  # closer than that moves them (tests/near_ties.py).
  logits = np.asarray(heads.logits("linear", w0, query))
  near_ties.assert_accuracy_within_near_ties(
      m["accuracy"], np.mean(logits.argmax(-1) == eps.query_labels, -1),
      near_ties.margins(logits) < near_ties.linear_perturbation_tolerance(w0, query, 1e-4))
  protos = jax.vmap(prototypes.class_means, (0, 0, None))(support, eps.support_labels, WAYS)
  scores = near_ties.cosine_scores(query, protos)
  near_ties.assert_accuracy_within_near_ties(
      m["prototype_accuracy"], np.mean(scores.argmax(-1) == eps.query_labels, -1),
      near_ties.margins(scores) < near_ties.cosine_rounding_tolerance(D, SHOTS))
  for b in range(4):
    loss = heads.support_loss("linear", w0[b], support[b], eps.support_labels[b], "mean")
    np.testing.assert_allclose(m["support_loss"][b], loss, rtol=1e-5)
    fit = heads.fit_linear(support[b], eps.support_labels[b], jnp.ones(WAYS * SHOTS, bool),
                           WAYS, 30, 0.05)
    ratio = np.linalg.norm(w0[b], axis=-1).mean() / np.linalg.norm(fit, axis=-1).mean()
    np.testing.assert_allclose(m["norm_ratio"][b], ratio, rtol=1e-4)


def test_load_denoiser_without_the_unet_needs_no_checkpoint(tmp_path):
  config = variant_config(head="linear", unet=False, stages=("eval",))
  metadiff, state, init_state, meta = workdir_lib.load_denoiser(config, str(tmp_path), SHOTS, D)
  model = metadiff.model
  assert (model.head, model.unet, model.feature_dim) == ("linear", False, D + 1)
  assert state is init_state and meta == {} and not jax.tree_util.tree_leaves(state.params)
  # The eval stage hands the sampler {"params": {}}: eps is the linear head's gradient.
  w_all, support, labels = make_episodes(2)
  sched = schedule.linear(T, 1e-2, 0.2)
  w0 = diffusion.sample_batch(model, {"params": state.params}, sched, w_all, support, labels)
  np.testing.assert_array_equal(w0, diffusion.sample_batch(model, {}, sched, w_all, support,
                                                           labels))


# ----------------------------------------------------------------------------- config

def variant_config(head="prototype", gradient="l2", unet=True, stages=None):
  """The paper's ablations (Tables 3-4) are of its TCUNet: the faithful variant's config."""
  config = config_lib.base_config()
  config_lib.apply_variant(config, "faithful")
  config.train.ways = WAYS
  config.denoiser.hidden_dims = (8, 4)
  config.denoiser.time_embed_dim = 8
  config.diffusion.num_steps = T
  config.prototypes.linear_fit_steps = 7
  config.denoiser.update(dict(head=head, gradient=gradient, unet=unet))
  if stages is not None:
    config.stages = stages
  return config


@pytest.mark.parametrize("change, match", [
    (dict(head="softmax"), r"config.denoiser.head must be one of prototype, linear"),
    (dict(gradient="l1"), r"config.denoiser.gradient must be one of l2, cosine_ce"),
    (dict(head="linear", gradient="cosine_ce"), r"prototype-head variant.*set it to 'l2'"),
    (dict(unet=False), r"nothing to train; drop 'train' from config.stages"),
    (dict(linear_fit_steps=0), r"linear_fit_steps must be an integer >= 1"),
    (dict(linear_fit_l2=-1.0), r"linear_fit_l2 must be >= 0"),
])
def test_config_mistakes(change, match):
  config = config_lib.base_config()
  for field, value in change.items():
    section = "prototypes" if field.startswith("linear_fit") else "denoiser"
    config[section][field] = value
  with pytest.raises(ConfigError, match=match) as info:
    checks.check(config)
  assert "\n" not in str(info.value)


def test_the_default_config_and_the_ablations_pass_the_checks():
  checks.check(config_lib.base_config())
  checks.check(variant_config(head="linear"))
  checks.check(variant_config(gradient="cosine_ce", unet=False,
                              stages=("pretrain", "prototypes", "eval")))
