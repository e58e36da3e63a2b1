import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close_to_scale, episode
from metadiff_jax import diffusion, prototypes, schedule, tcunet


@pytest.mark.parametrize("shots", [1, 5])
def test_noising_and_loss_match_reference(ref, ref_model, ref_schedule, shots):
  model, variables = ref_model
  get = lambda name: episode(ref, shots, name)
  w_t = diffusion.q_sample(ref_schedule, get("loss_w0"), get("loss_t"), get("loss_noise"))
  assert_close_to_scale(w_t, ref[f"k{shots}/loss_w_t"], 1e-6)
  value = diffusion.loss_from_noise(model, variables, ref_schedule, get("loss_w0"),
                                    get("support"), get("support_labels"), get("loss_t"),
                                    get("loss_noise"))
  np.testing.assert_allclose(float(value), float(ref[f"k{shots}/loss_value"]), rtol=1e-5)


@pytest.mark.parametrize("shots", [1, 5])
def test_sampler_and_logits_match_reference(ref, ref_model, ref_schedule, shots):
  model, variables = ref_model
  get = lambda name: episode(ref, shots, name)
  w0 = diffusion.sample_batch(model, variables, ref_schedule, get("sample_wT"), get("support"),
                              get("support_labels"))
  assert_close_to_scale(w0, ref[f"k{shots}/sample_w0"], 1e-3)
  logits = prototypes.cosine_logits(get("query"), w0, scale=10.0)
  assert_close_to_scale(logits, ref[f"k{shots}/sample_logits"], 1e-3)
  # One episode at a time gives the same.
  for b in range(w0.shape[0]):
    single = diffusion.sample(model, variables, ref_schedule, get("sample_wT")[b],
                              get("support")[b], get("support_labels")[b])
    assert_close_to_scale(single, ref[f"k{shots}/sample_w0"][b], 1e-3)


@pytest.fixture(scope="module")
def tiny():
  """A small denoiser with nonzero random weights, T = 12, 4-way 2-shot, D = 24."""
  model = tcunet.TCUNet(feature_dim=24, hidden_dims=(16, 8), time_embed_dim=16)
  sched = schedule.linear(num_steps=12, beta_start=1e-3, beta_end=0.2)
  rng = np.random.default_rng(0)
  b, n, k = 5, 4, 2
  w_T = jnp.asarray(rng.standard_normal((b, n, 24)), jnp.float32)
  support = jnp.asarray(rng.standard_normal((b, n * k, 24)), jnp.float32)
  labels = jnp.asarray(np.stack([rng.permutation(np.repeat(np.arange(n), k)) for _ in range(b)]),
                       jnp.int32)
  variables = model.init(jax.random.key(3), w_T[0], 0, support[0], labels[0])
  return model, variables, sched, w_T, support, labels


def python_loop_sampler(model, variables, sched, w, support, labels):
  """The reverse process written plainly, one step at a time."""
  states = [w]
  for t in reversed(range(sched.num_steps)):
    eps = model.apply(variables, w, t, support, labels)
    w = (w - sched.remove_noise_coeff[t] * eps) * sched.reciprocal_sqrt_alphas[t]
    states.append(w)
  return states


def test_scan_sampler_equals_a_python_loop_with_trajectory(tiny):
  model, variables, sched, w_T, support, labels = tiny
  states = python_loop_sampler(model, variables, sched, w_T[1], support[1], labels[1])
  w0, trajectory = diffusion.sample(model, variables, sched, w_T[1], support[1], labels[1],
                                    trajectory_every=4)
  assert trajectory.shape == (12 // 4 + 1, 4, 24)
  np.testing.assert_allclose(w0, states[-1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(trajectory, np.stack(states[::4]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(trajectory[0], w_T[1])


def test_sample_batch_equals_a_loop_of_sample(tiny):
  model, variables, sched, w_T, support, labels = tiny
  batch, trajectories = diffusion.sample_batch(model, variables, sched, w_T, support, labels,
                                               trajectory_every=3)
  assert batch.shape == w_T.shape and trajectories.shape == (5, 5, 4, 24)
  for b in range(w_T.shape[0]):
    single = diffusion.sample(model, variables, sched, w_T[b], support[b], labels[b])
    np.testing.assert_allclose(batch[b], single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trajectories[b, -1], single, rtol=1e-5, atol=1e-5)


def test_sample_batch_compiles_once_per_shape(tiny):
  model, variables, sched, w_T, support, labels = tiny
  model = model.clone(time_embed_dim=18)  # a module no other test traces
  variables = model.init(jax.random.key(0), w_T[0], 0, support[0], labels[0])
  before = diffusion.TRACE_COUNTS["sample_batch"]
  run = lambda *a: diffusion.sample_batch(model, variables, sched, *a).block_until_ready()
  run(w_T, support, labels)
  run(w_T + 1.0, support * 2.0, labels[::-1])  # new values, same shapes
  run(w_T, support, labels)
  assert diffusion.TRACE_COUNTS["sample_batch"] - before == 1
  run(w_T[:3], support[:3], labels[:3])  # a new episode count
  run(w_T[:3] - 1.0, support[:3], labels[:3])
  assert diffusion.TRACE_COUNTS["sample_batch"] - before == 2
  # Other weights of the same module reuse the compiled sampler.
  other = jax.tree_util.tree_map(lambda x: x * 0.5, variables)
  diffusion.sample_batch(model, other, sched, w_T, support, labels).block_until_ready()
  assert diffusion.TRACE_COUNTS["sample_batch"] - before == 2


def test_hidden_dims_from_a_list_keep_the_module_usable_as_a_static_argument(tiny):
  _, _, sched, w_T, support, labels = tiny
  model = tcunet.TCUNet(feature_dim=24, hidden_dims=[16, 8], time_embed_dim=16)
  assert model.hidden_dims == (16, 8)
  variables = model.init(jax.random.key(0), w_T[0], 0, support[0], labels[0])
  assert diffusion.sample_batch(model, variables, sched, w_T, support, labels).shape == w_T.shape


def test_random_loss_draws_per_episode_steps_and_noise(tiny):
  model, variables, sched, w_T, support, labels = tiny
  key = jax.random.key(7)
  value = diffusion.loss(model, variables, sched, w_T, support, labels, key)
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, (5,), 0, sched.num_steps)
  noise = jax.random.normal(noise_key, w_T.shape)
  expected = diffusion.loss_from_noise(model, variables, sched, w_T, support, labels, t, noise)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  # By hand: noise each episode at its own step, predict, and average over all entries.
  by_hand = []
  for b in range(5):
    w_t = (sched.sqrt_alphas_cumprod[t[b]] * w_T[b]
           + sched.sqrt_one_minus_alphas_cumprod[t[b]] * noise[b])
    by_hand.append((model.apply(variables, w_t, t[b], support[b], labels[b]) - noise[b]) ** 2)
  np.testing.assert_allclose(value, np.mean(np.stack(by_hand)), rtol=1e-5)
  other = diffusion.loss(model, variables, sched, w_T, support, labels, jax.random.key(8))
  assert float(other) != float(value)


def test_loss_gradient_is_finite_and_nonzero(tiny):
  model, variables, sched, w_T, support, labels = tiny
  grads = jax.jit(jax.grad(
      lambda v: diffusion.loss(model, v, sched, w_T, support, labels, jax.random.key(0))))(
          variables)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_bad_inputs(tiny):
  model, variables, sched, w_T, support, labels = tiny
  sample = lambda w, s, y, **kw: diffusion.sample_batch(model, variables, sched, w, s, y, **kw)
  with pytest.raises(ValueError, match=r"`w_T` must be \[B, N, D\]"):
    sample(w_T[0], support, labels)
  with pytest.raises(ValueError, match="episode axes differ"):
    sample(w_T[:2], support, labels)
  with pytest.raises(ValueError, match=r"feature dim D = 24 but `w_T` has D = 20"):
    sample(w_T[..., :20], support, labels)
  with pytest.raises(ValueError, match="support_labels` has 7 labels"):
    sample(w_T, support, labels[:, :7])
  with pytest.raises(TypeError, match="integers"):
    sample(w_T, support, labels.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"\[0, 3\)"):  # w_T has 3 ways, labels reach 3
    sample(w_T[:, :3], support, labels)
  with pytest.raises(ValueError, match="trajectory_every"):
    sample(w_T, support, labels, trajectory_every=5)
  with pytest.raises(ValueError, match=r"`w_T` must be \[N, D\]"):
    diffusion.sample(model, variables, sched, w_T, support[0], labels[0])
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    diffusion.sample(model, variables, sched, w_T[0], support[0], labels[0] + 1)
  loss = lambda w0, t, noise: diffusion.loss_from_noise(
      model, variables, sched, w0, support, labels, t, noise)
  t = jnp.zeros((5,), jnp.int32)
  with pytest.raises(ValueError, match="`noise` must have the shape of `w0`"):
    loss(w_T, t, w_T[:, :3])
  with pytest.raises(TypeError, match=r"`t` must be \[B\]"):
    loss(w_T, t.astype(jnp.float32), w_T)
  with pytest.raises(ValueError, match=r"`t` must lie in \[0, 12\)"):
    loss(w_T, t + 12, w_T)
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    diffusion.loss(model, variables, sched, w_T, support, labels - 1, jax.random.key(0))


def test_out_of_range_labels_under_a_trace_give_nan_not_a_wrong_answer(tiny):
  model, variables, sched, w_T, support, labels = tiny
  run = jax.jit(lambda y: diffusion.sample_batch(model, variables, sched, w_T, support, y))
  bad = labels.at[2, 0].set(4)
  out = np.asarray(run(bad))
  assert np.all(np.isnan(out[2]))
  assert np.all(np.isfinite(np.delete(out, 2, axis=0)))


def test_hoisted_batch_sampler_equals_a_python_loop_per_episode(tiny):
  model, variables, sched, w_T, support, labels = tiny
  w0 = diffusion.sample_batch(model, variables, sched, w_T, support, labels)
  for b in range(w_T.shape[0]):
    states = python_loop_sampler(model, variables, sched, w_T[b], support[b], labels[b])
    np.testing.assert_allclose(w0[b], states[-1], rtol=1e-5, atol=1e-5)


def test_bfloat16_and_precision_settings(tiny):
  model, variables, sched, w_T, support, labels = tiny
  run = lambda **kw: diffusion.sample_batch(model, variables, sched, w_T, support, labels, **kw)
  exact = run(precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(run(), exact, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run(precision="highest"), exact, rtol=0, atol=0)
  np.testing.assert_allclose(run(precision="high"), exact, rtol=1e-3, atol=1e-3)
  low, trajectory = run(dtype=jnp.bfloat16, trajectory_every=6)
  # The network runs in bf16; the carried weights and the update stay float32.
  assert low.dtype == jnp.float32 and trajectory.dtype == jnp.float32
  assert_close_to_scale(low, exact, 5e-2)
  assert float(jnp.abs(low - exact).max()) > 0  # it did compute in bf16
  np.testing.assert_array_equal(trajectory[:, 0], w_T)
  np.testing.assert_array_equal(trajectory[:, -1], low)
  # The same for one episode, and a bf16 loop of the cloned network agrees with the scan.
  single = diffusion.sample(model, variables, sched, w_T[2], support[2], labels[2],
                            dtype="bfloat16", precision="highest")
  assert single.dtype == jnp.float32
  assert_close_to_scale(single, low[2], 2e-2)
  bf16_model = model.clone(dtype=jnp.bfloat16)
  w = w_T[2]
  for t in reversed(range(sched.num_steps)):
    eps = bf16_model.apply(variables, w, t, support[2], labels[2]).astype(jnp.float32)
    w = (w - sched.remove_noise_coeff[t] * eps) * sched.reciprocal_sqrt_alphas[t]
  assert_close_to_scale(low[2], w, 2e-2)


def test_sample_batch_compiles_once_per_setting(tiny):
  model, _, sched, w_T, support, labels = tiny
  model = model.clone(time_embed_dim=14)  # a module no other test traces
  variables = model.init(jax.random.key(0), w_T[0], 0, support[0], labels[0])
  count = lambda: diffusion.TRACE_COUNTS["sample_batch"]
  before = count()
  settings = [dict(), dict(precision="highest"), dict(dtype=jnp.bfloat16),
              dict(dtype=jnp.bfloat16, precision="highest")]
  for i, kwargs in enumerate(settings):
    for scale in (1.0, 2.0):  # new values, same setting: no new trace
      diffusion.sample_batch(model, variables, sched, w_T * scale, support, labels,
                             **kwargs).block_until_ready()
    assert count() - before == i + 1
  # Equal settings spelled differently share the compiled sampler.
  diffusion.sample_batch(model, variables, sched, w_T, support, labels,
                         precision=jax.lax.Precision.HIGHEST, dtype="bfloat16")
  diffusion.sample_batch(model, variables, sched, w_T, support, labels, precision="HIGHEST")
  assert count() - before == len(settings)
  # Another number of steps is another program; another schedule of the same length is not.
  diffusion.sample_batch(model, variables, schedule.linear(6), w_T, support, labels)
  diffusion.sample_batch(model, variables, schedule.cosine(6), w_T, support, labels)
  assert count() - before == len(settings) + 1


def test_bad_dtype_and_precision(tiny):
  model, variables, sched, w_T, support, labels = tiny
  with pytest.raises(ValueError, match="precision must be"):
    diffusion.sample_batch(model, variables, sched, w_T, support, labels, precision="fast")
  with pytest.raises(ValueError, match="floating dtype"):
    diffusion.sample(model, variables, sched, w_T[0], support[0], labels[0], dtype=jnp.int32)


def test_reference_sampler_at_highest_precision_and_in_bfloat16(ref, ref_model, ref_schedule):
  model, variables = ref_model
  get = lambda name: episode(ref, 1, name)
  args = (model, variables, ref_schedule, get("sample_wT"), get("support"),
          get("support_labels"))
  exact = diffusion.sample_batch(*args, precision="highest")
  assert_close_to_scale(exact, ref["k1/sample_w0"], 1e-3)
  low = diffusion.sample_batch(*args, dtype=jnp.bfloat16)
  assert_close_to_scale(low, ref["k1/sample_w0"], 5e-2)
  # The query predictions barely move.
  predict = lambda w0: np.argmax(prototypes.cosine_logits(get("query"), w0), axis=-1)
  assert np.mean(predict(low) != predict(exact)) <= 0.05
