"""The meta-optimizer baselines: shapes, Eq. 4 against a loop, second-order meta-gradients,
meta-training that helps, and a training step's memory linear in the inner steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import heads, metaopt, prototypes

HEADS = ("prototype", "linear")
TRAINABLE = ("anil", "metalstm", "alfa")
# Compiling dominates this file's time; XLA's backend optimisations halve it, and these tiny
# programs run in milliseconds either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def random_episodes(seed, episodes, ways, shots, dim):
  """[B, N*K, D] Gaussian features and [B, N*K] shuffled labels."""
  rng = np.random.default_rng(seed)
  labels = np.stack([rng.permutation(np.repeat(np.arange(ways), shots))
                     for _ in range(episodes)]).astype(np.int32)
  support = rng.standard_normal((episodes, ways * shots, dim)).astype(np.float32)
  return jnp.asarray(support), jnp.asarray(labels)


def few_shot_problem(seed, shape, ways=3, shots=2, queries=5, dim=8, offset=3.0, noise=0.5):
  """Synthetic episodes: a shared offset + a per-task class signal N(0, I) + noise.

  The offset is the same for every task (a fixed direction), the class centres are new in
  every task. Returns support [..., N*K, D], its labels, query [..., N*Q, D], its labels.
  """
  rng = np.random.default_rng(seed)
  shift = offset * np.random.default_rng(123).standard_normal(dim) / np.sqrt(dim)
  centres = rng.standard_normal(shape + (ways, dim))
  out = []
  for per_class in (shots, queries):
    labels = np.broadcast_to(np.repeat(np.arange(ways), per_class), shape + (ways * per_class,))
    x = (shift + np.take_along_axis(centres, labels[..., None], -2)
         + noise * rng.standard_normal(labels.shape + (dim,)))
    out += [jnp.asarray(x, jnp.float32), jnp.asarray(labels, jnp.int32)]
  return tuple(out)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("name", sorted(metaopt.METHODS))
def test_shapes_vmap_and_determinism(name, head):
  ways, dim = 4, 8
  method = metaopt.make(name, head=head, ways=ways, feature_dim=dim, steps=3)
  assert method.trainable == (name != "gda")
  params = method.init(jax.random.key(0))
  support, labels = random_episodes(0, 3, ways, 2, dim)
  keys = jax.random.split(jax.random.key(1), 3)
  batch = jax.jit(metaopt.adapt_batch, static_argnums=0, compiler_options=FAST_COMPILE)
  w = batch(method, params, support, labels, keys)
  assert w.shape == (3, ways, heads.weight_dim(head, dim)) == (3,) + method.weight_shape
  assert np.all(np.isfinite(w))
  # Episodes are independent (reordering them reorders the weights; no recompilation at the
  # same shapes), and the same key gives the same weights.
  flipped = batch(method, params, support[::-1], labels[::-1], keys[::-1])
  np.testing.assert_allclose(flipped[::-1], w, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(w, batch(method, params, support, labels, keys))
  other = batch(method, params, support, labels, jax.random.split(jax.random.key(2), 3))
  # Only GDA and ALFA draw their initial weights; ANIL and MetaLSTM learn theirs.
  assert np.array_equal(w, other) == (name in ("anil", "metalstm"))


def test_methods_are_static_arguments_that_compile_once():
  traces = []

  @functools.partial(jax.jit, static_argnums=0)
  def adapt(method, support, labels, key):
    traces.append(method)
    return method.adapt({}, support, labels, key)

  support, labels = random_episodes(0, 1, 3, 2, 8)
  for _ in range(2):  # equal but distinct instances: one trace
    method = metaopt.GDA(head="prototype", ways=3, feature_dim=8, steps=2)
    adapt(method, support[0], labels[0], jax.random.key(0))
  assert len(traces) == 1


def test_make_and_validation():
  assert isinstance(metaopt.make("alfa", head="linear", ways=5, feature_dim=4, steps=2),
                    metaopt.ALFA)
  with pytest.raises(ValueError, match="unknown meta-optimizer 'maml'"):
    metaopt.make("maml", head="linear", ways=5, feature_dim=4, steps=2)
  with pytest.raises(ValueError, match="unknown head"):
    metaopt.GDA(head="cosine", ways=5, feature_dim=4, steps=2)
  with pytest.raises(ValueError, match="momentum"):
    metaopt.GDA(head="linear", ways=5, feature_dim=4, steps=2, momentum=1.0)
  # Each method's hyperparameters and the shared fields are checked against their intervals.
  fields = dict(head="linear", ways=5, feature_dim=4, steps=2)
  for name, bad in (("gda", dict(momentum=-0.1)), ("anil", dict(init_learning_rate=0.0)),
                    ("metalstm", dict(learning_rate=1.0)), ("metalstm", dict(learning_rate=0.0)),
                    ("alfa", dict(ways=0)), ("gda", dict(feature_dim=0)), ("anil", dict(steps=-1))):
    (field, value), = bad.items()
    with pytest.raises(ValueError, match=rf"\.{field} must lie in .*, got {value}"):
      metaopt.make(name, **{**fields, **bad})
  metaopt.make("gda", **{**fields, "steps": 0}, momentum=0.0)  # both closed ends are allowed
  metaopt.make("metalstm", **fields, learning_rate=0.5)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_gda_is_eq4_as_a_python_loop(head, momentum):
  ways, dim, steps, lr, std = 3, 6, 7, 0.05, 0.5
  method = metaopt.GDA(head=head, ways=ways, feature_dim=dim, steps=steps, learning_rate=lr,
                       momentum=momentum, init_std=std)
  support, labels = random_episodes(3, 1, ways, 2, dim)
  key = jax.random.key(5)
  w = std * jax.random.normal(key, method.weight_shape)
  velocity = jnp.zeros_like(w)
  for _ in range(steps):
    grad = jax.grad(heads.support_loss, argnums=1)(head, w, support[0], labels[0])
    velocity = momentum * velocity + grad
    w = w - lr * velocity  # Eq. 4 (heavy ball when momentum > 0)
  np.testing.assert_allclose(method.adapt({}, support[0], labels[0], key), w, rtol=1e-4,
                             atol=1e-5)


def test_untrained_alfa_and_metalstm_are_gradient_descent():
  head, ways, dim, steps, lr = "linear", 3, 8, 5, 0.02
  support, labels = random_episodes(6, 1, ways, 2, dim)
  support, labels = support[0], labels[0]
  key = jax.random.key(3)
  # ALFA's generator starts at multipliers 1: exactly GDA with its base rate.
  alfa = metaopt.ALFA(head=head, ways=ways, feature_dim=dim, steps=steps, learning_rate=lr)
  gda = metaopt.GDA(head=head, ways=ways, feature_dim=dim, steps=steps, learning_rate=lr)
  np.testing.assert_allclose(alfa.adapt(alfa.init(key), support, labels, key),
                             gda.adapt({}, support, labels, key), rtol=1e-5, atol=1e-6)
  # MetaLSTM's gates start near f = sigmoid(forget_bias), i = learning_rate.
  lstm = metaopt.MetaLSTM(head=head, ways=ways, feature_dim=dim, steps=steps,
                          learning_rate=lr, init_std=1.0)
  params = lstm.init(key)
  w = w0 = params["theta0"]
  for _ in range(steps):
    w = jax.nn.sigmoid(lstm.forget_bias) * w - lr * heads.support_grad(head, w, support, labels)
  out = lstm.adapt(params, support, labels, key)
  assert float(jnp.linalg.norm(out - w)) < 0.05 * float(jnp.linalg.norm(w - w0))


@pytest.mark.parametrize("shots", [1, 3])
def test_gda_reaches_the_class_means(shots):
  # Eq. 11 summed: w_k contracts to the class mean by (1 - 2 lr n_k) per step.
  ways, dim = 4, 8
  method = metaopt.GDA(head="prototype", ways=ways, feature_dim=dim, steps=200,
                       learning_rate=0.1 / shots)
  support, labels = random_episodes(4, 1, ways, shots, dim)
  w = method.adapt({}, support[0], labels[0], jax.random.key(0))
  np.testing.assert_allclose(w, prototypes.class_means(support[0], labels[0], ways), atol=1e-5)


def test_anil_meta_gradient_is_second_order():
  head, ways, dim = "linear", 3, 8
  support, labels, query, query_labels = few_shot_problem(0, (4,))
  keys = jax.random.split(jax.random.key(0), 4)

  def lr_grad(first_order):
    method = metaopt.ANIL(head=head, ways=ways, feature_dim=dim, steps=4,
                          init_learning_rate=0.05, first_order=first_order)
    params = method.init(jax.random.key(1))
    meta_grad = jax.jit(jax.grad(metaopt.outer_loss, argnums=1), static_argnums=0,
                        compiler_options=FAST_COMPILE)
    grads = meta_grad(method, params, support, labels, query, query_labels, keys)
    return float(grads["log_lr"])

  second, first = lr_grad(False), lr_grad(True)
  assert np.isfinite(second) and abs(second) > 1e-6
  # The unrolled steps' Jacobians (I - lr * Hessian) matter: not the first-order value.
  assert abs(second - first) > 1e-3 * abs(second), (second, first)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def meta_train_and_evaluate(method, state, batches, held_out, keys, key):
  """Meta-trains on batches [steps, B, ...]; evaluates the held-out episodes before and after.

  One compiled call (compiling dominates these tests' time). Returns the trained state, the
  outer losses [steps], and (accuracy, query loss) before and after.
  """
  def evaluate(params):
    return (jnp.mean(metaopt.episode_accuracy(method, params, *held_out, keys)),
            metaopt.outer_loss(method, params, *held_out, keys))

  before = evaluate(state.params)
  state, losses = jax.lax.scan(lambda s, b: metaopt.meta_train_step(method, s, *b, key),
                               state, batches)
  return state, losses, before, evaluate(state.params)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("name", TRAINABLE)
def test_meta_training_beats_the_untrained_method(name, head):
  # Untrained, every method is a few small gradient steps from weights far from the answer
  # (random, std 1, against class centres of the same size under a shared offset), so its
  # query accuracy is poor; a learned step size, decay or initialisation fixes that.
  hyper = {"anil": "init_learning_rate", "metalstm": "learning_rate", "alfa": "learning_rate"}
  method = metaopt.make(name, head=head, ways=3, feature_dim=8, steps=3, init_std=1.0,
                        **{hyper[name]: 0.02})
  train = few_shot_problem(0, (300, 8))
  held_out = few_shot_problem(1, (300,))
  keys = jax.random.split(jax.random.key(7), 300)  # the same episodes and draws for both
  state = metaopt.create_state(method, jax.random.key(0), learning_rate=1e-2)
  state, losses, (acc_before, loss_before), (acc_after, loss_after) = meta_train_and_evaluate(
      method, state, train, held_out, keys, jax.random.key(1))
  assert int(state.step) == 300 and np.all(np.isfinite(losses))
  assert acc_after > acc_before + 0.2, (acc_before, acc_after)
  assert loss_after < 0.5 * loss_before, (loss_before, loss_after)


@pytest.mark.parametrize("name", TRAINABLE)
def test_train_step_memory_grows_linearly_with_steps(name):
  def memory(steps, options=FAST_COMPILE):
    method = metaopt.make(name, head="prototype", ways=3, feature_dim=8, steps=int(steps))
    return metaopt.train_step_memory(method, episodes=4, shots=1, queries=2,
                                     compiler_options=options)

  steps = np.array([4, 8, 16, 32])
  bytes_ = np.array([memory(k) for k in steps], np.float64)
  assert np.all(np.diff(bytes_) > 0), bytes_
  slope, intercept = np.polyfit(steps, bytes_, 1)
  r2 = 1 - np.sum((bytes_ - (slope * steps + intercept)) ** 2) / np.sum(
      (bytes_ - bytes_.mean()) ** 2)
  assert slope > 0 and r2 > 0.95, (bytes_, slope, r2)
  # Each step adds the same residuals: the per-step increments agree.
  per_step = np.diff(bytes_) / np.diff(steps)
  assert per_step.max() < 1.2 * per_step.min(), per_step
  if name == "anil":  # the fast compile assigns the same buffers as the default one
    assert memory(4, options=None) == bytes_[0]


def test_compiled_bytes_counts_donated_buffers_once():
  x = jax.ShapeDtypeStruct((1024,), jnp.float32)  # 4 KiB in, 4 KiB out, no temporaries
  donated = jax.jit(lambda x: x + 1, donate_argnums=0).lower(x).compile()
  kept = jax.jit(lambda x: x + 1).lower(x).compile()
  assert metaopt.compiled_bytes(kept) == 2 * 4096
  assert metaopt.compiled_bytes(donated) == 4096
