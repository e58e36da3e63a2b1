"""Timestep respacing (Nichol & Dhariwal 2021, Section 4): schedules and respaced samplers."""

import fractions
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import diffusion, schedule, tcunet


def assert_schedules_equal(a, b):
  for field in schedule.Schedule._fields:
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert getattr(a, field).dtype == getattr(b, field).dtype, field


def config(**fields):
  """A config whose `diffusion` section has `fields` (an object without the absent ones)."""
  section = dict(schedule="linear", num_steps=1000, beta_start=1e-4, beta_end=0.02) | fields
  return types.SimpleNamespace(diffusion=types.SimpleNamespace(**section))


def even_steps(num_steps, k):
  """round(linspace(0, T - 1, K)) with halves rounded up, in exact arithmetic ([T-1] for K = 1)."""
  if k == 1:
    return np.array([num_steps - 1])
  half = fractions.Fraction(1, 2)
  return np.array([math.floor(fractions.Fraction(i * (num_steps - 1), k - 1) + half)
                   for i in range(k)])


@pytest.mark.parametrize("num_steps, k", [(1000, 50), (1000, 1000), (1000, 999), (1000, 2),
                                          (7, 3), (7, 6), (2, 2), (1, 1), (1000, 333), (200, 199)])
def test_space_timesteps_are_even_and_span_the_schedule(num_steps, k):
  tau = schedule.space_timesteps(num_steps, k)
  assert tau.shape == (k,) and np.issubdtype(tau.dtype, np.integer)
  np.testing.assert_array_equal(tau, even_steps(num_steps, k))
  assert tau[0] == 0 and tau[-1] == num_steps - 1
  assert np.all(np.diff(tau) >= 1)
  if k > 1:  # evenly spaced: gaps differ by at most one
    assert np.diff(tau).max() - np.diff(tau).min() <= 1


def test_space_timesteps_edge_cases():
  np.testing.assert_array_equal(schedule.space_timesteps(1000, None), np.arange(1000))
  np.testing.assert_array_equal(schedule.space_timesteps(1000, 1000), np.arange(1000))
  # One step: the jump from the noisiest step, not a step at t = 0 on pure noise.
  np.testing.assert_array_equal(schedule.space_timesteps(1000, 1), [999])
  np.testing.assert_array_equal(schedule.space_timesteps(1000, 2), [0, 999])
  # Every K from 1 to T gives K distinct steps (halves are rounded up, not to even).
  for k in range(1, 65):
    assert np.unique(schedule.space_timesteps(64, k)).size == k


@pytest.mark.parametrize("k", [0, -3, 1001, 2.5, True, "50"])
def test_bad_numbers_of_sampling_steps_are_rejected(k):
  with pytest.raises(ValueError, match=r"num_sampling_steps must be an int in \[1, T = 1000\]"):
    schedule.space_timesteps(1000, k)
  with pytest.raises(ValueError, match="num_sampling_steps"):
    schedule.respace(schedule.linear(1000), k)
  with pytest.raises(ValueError, match="num_sampling_steps"):
    schedule.for_sampling(config(num_sampling_steps=k))


def test_full_respacing_is_the_schedule_itself():
  sched = schedule.linear(1000)
  np.testing.assert_array_equal(sched.timesteps, np.arange(1000))
  assert sched.timesteps.dtype == jnp.int32
  assert schedule.respace(sched, None) is sched
  assert schedule.respace(sched, 1000) is sched
  assert schedule.respace_at(sched, np.arange(1000)) is sched


def _cosine_betas(num_steps, s=0.008):
  f = lambda u: np.cos((u / num_steps + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(num_steps)
  return np.minimum(1 - f(t + 1) / f(t), 0.999)


@pytest.mark.parametrize("make, betas64", [
    (lambda: schedule.linear(1000), lambda: np.linspace(1e-4, 0.02, 1000)),
    (lambda: schedule.linear(200, 1e-3, 0.05), lambda: np.linspace(1e-3, 0.05, 200)),
    (lambda: schedule.cosine(1000), lambda: _cosine_betas(1000)),
])
@pytest.mark.parametrize("k", [1, 2, 10, 50, -1])
def test_respaced_coefficients_follow_improved_ddpm(make, betas64, k):
  sched = make()
  num_steps = sched.num_steps
  k = num_steps - 1 if k == -1 else k
  respaced = schedule.respace(sched, k)
  assert respaced.num_steps == k
  # Independently, in float64 numpy from the schedule's own definition: abar at the kept
  # steps, and betas that reproduce it.
  tau = even_steps(num_steps, k)
  abar = np.cumprod(1 - betas64())[tau]
  betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
  np.testing.assert_array_equal(respaced.timesteps, tau)
  assert respaced.timesteps.dtype == jnp.int32
  np.testing.assert_allclose(respaced.alphas_cumprod, abar, rtol=1e-6)
  np.testing.assert_allclose(respaced.alphas_cumprod, np.asarray(sched.alphas_cumprod)[tau],
                             rtol=2e-6)
  np.testing.assert_allclose(respaced.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(respaced.alphas, 1 - betas, rtol=1e-6)
  np.testing.assert_allclose(respaced.sqrt_alphas_cumprod, np.sqrt(abar), rtol=1e-6)
  np.testing.assert_allclose(respaced.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - abar),
                             rtol=1e-6)
  np.testing.assert_allclose(respaced.remove_noise_coeff, betas / np.sqrt(1 - abar), rtol=1e-5)
  np.testing.assert_allclose(respaced.reciprocal_sqrt_alphas, 1 / np.sqrt(1 - betas), rtol=1e-6)
  np.testing.assert_allclose(respaced.sigmas, np.sqrt(betas), rtol=1e-6)
  for field in schedule.Schedule._fields:
    assert getattr(respaced, field).shape == (k,)


def test_respacing_a_respaced_schedule_composes_the_steps():
  sched = schedule.linear(1000)
  coarse = schedule.respace(schedule.respace(sched, 100), 10)
  np.testing.assert_array_equal(
      coarse.timesteps, schedule.respace(sched, 100).timesteps[schedule.space_timesteps(100, 10)])
  np.testing.assert_allclose(coarse.alphas_cumprod,
                             np.asarray(sched.alphas_cumprod)[coarse.timesteps], rtol=2e-6)


def test_respace_at_rejects_bad_steps():
  sched = schedule.linear(10)
  for steps in ([], [3, 2], [0, 0, 9], [0, 10], [-1, 9], [0.0, 9.0]):
    with pytest.raises(ValueError, match="strictly increasing"):
      schedule.respace_at(sched, steps)
  custom = schedule.respace_at(sched, [0, 4, 9])
  np.testing.assert_array_equal(custom.timesteps, [0, 4, 9])


def test_for_sampling_reads_the_config():
  full = schedule.from_config(config())
  # Configs that predate num_sampling_steps, None, and K = T: the training schedule, bitwise.
  assert_schedules_equal(schedule.for_sampling(config()), full)
  assert_schedules_equal(schedule.for_sampling(config(num_sampling_steps=None)), full)
  assert_schedules_equal(schedule.for_sampling(config(num_sampling_steps=1000)), full)
  assert_schedules_equal(schedule.for_sampling(config().diffusion), full)  # a section itself
  # K < T: respaced from the float64 betas, which agrees with respacing the float32 schedule.
  fifty = schedule.for_sampling(config(num_sampling_steps=50))
  by_respace = schedule.respace(full, 50)
  np.testing.assert_array_equal(fifty.timesteps, by_respace.timesteps)
  for field in schedule.Schedule._fields[:-1]:
    np.testing.assert_allclose(getattr(fifty, field), getattr(by_respace, field), rtol=2e-6,
                               err_msg=field)
  cosine = schedule.for_sampling(config(schedule="cosine", num_sampling_steps=10))
  np.testing.assert_allclose(cosine.alphas_cumprod,
                             np.asarray(schedule.cosine(1000).alphas_cumprod)[cosine.timesteps],
                             rtol=2e-6)


def test_for_sampling_with_ml_collections():
  import ml_collections
  section = ml_collections.ConfigDict(
      dict(schedule="linear", num_steps=100, beta_start=1e-4, beta_end=0.02))
  assert schedule.for_sampling(section).num_steps == 100  # no num_sampling_steps field
  section.num_sampling_steps = 20
  assert schedule.for_sampling(ml_collections.ConfigDict(dict(diffusion=section))).num_steps == 20


@pytest.fixture(scope="module")
def tiny():
  """A small denoiser with random weights, 4-way 2-shot, D = 24, 3 episodes."""
  model = tcunet.TCUNet(feature_dim=24, hidden_dims=(16, 8), time_embed_dim=16)
  rng = np.random.default_rng(1)
  b, n, k = 3, 4, 2
  w_T = jnp.asarray(rng.standard_normal((b, n, 24)), jnp.float32)
  support = jnp.abs(jnp.asarray(rng.standard_normal((b, n * k, 24)), jnp.float32))
  labels = jnp.asarray(np.tile(np.arange(n), (b, k)), jnp.int32)
  variables = model.init(jax.random.key(5), w_T[0], 0, support[0], labels[0])
  return model, variables, w_T, support, labels


def respaced_python_loop(model, variables, sched, w, support, labels):
  """The respaced reverse process written plainly: tell the network tau_i, update with i."""
  for i in reversed(range(sched.num_steps)):
    eps = model.apply(variables, w, sched.timesteps[i], support, labels)
    w = (w - sched.remove_noise_coeff[i] * eps) * sched.reciprocal_sqrt_alphas[i]
  return w


def test_respaced_sampler_equals_a_python_loop(tiny):
  model, variables, w_T, support, labels = tiny
  sched = schedule.respace(schedule.linear(60, 1e-3, 0.1), 7)
  w0 = diffusion.sample_batch(model, variables, sched, w_T, support, labels)
  for b in range(w_T.shape[0]):
    expected = respaced_python_loop(model, variables, sched, w_T[b], support[b], labels[b])
    np.testing.assert_allclose(w0[b], expected, rtol=1e-5, atol=1e-5)
    single = diffusion.sample(model, variables, sched, w_T[b], support[b], labels[b])
    np.testing.assert_allclose(single, expected, rtol=1e-5, atol=1e-5)


def test_respaced_sampling_with_all_steps_equals_the_full_sampler_exactly(tiny):
  model, variables, w_T, support, labels = tiny
  cfg = config(num_steps=40, num_sampling_steps=40)
  full = diffusion.sample_batch(model, variables, schedule.from_config(cfg), w_T, support,
                                labels)
  for sched in (schedule.for_sampling(cfg), schedule.respace(schedule.from_config(cfg), 40)):
    np.testing.assert_array_equal(
        diffusion.sample_batch(model, variables, sched, w_T, support, labels), full)


def test_one_step_sampler_predicts_w0_from_the_noisiest_step(tiny):
  model, variables, w_T, support, labels = tiny
  sched = schedule.linear(50, 1e-3, 0.2)
  one = schedule.respace(sched, 1)
  w0 = diffusion.sample_batch(model, variables, one, w_T, support, labels)
  abar = float(sched.alphas_cumprod[-1])
  for b in range(w_T.shape[0]):
    eps = model.apply(variables, w_T[b], 49, support[b], labels[b])
    np.testing.assert_allclose(w0[b], (w_T[b] - np.sqrt(1 - abar) * eps) / np.sqrt(abar),
                               rtol=1e-4, atol=1e-4)


def test_respaced_sampler_compiles_once_per_number_of_steps(tiny):
  _, _, w_T, support, labels = tiny
  model = tcunet.TCUNet(feature_dim=24, hidden_dims=(16, 8), time_embed_dim=22)  # fresh
  variables = model.init(jax.random.key(0), w_T[0], 0, support[0], labels[0])
  sched = schedule.linear(1000)
  before = diffusion.TRACE_COUNTS["sample_batch"]
  run = lambda s, w: diffusion.sample_batch(model, variables, s, w, support, labels)
  w0 = run(schedule.respace(sched, 50), w_T)
  assert w0.shape == w_T.shape and np.all(np.isfinite(w0))
  run(schedule.respace(sched, 50), w_T + 1.0)
  run(schedule.respace(schedule.linear(1000, beta_end=0.03), 50), w_T)  # other coefficients
  run(schedule.for_sampling(config(num_sampling_steps=50)), w_T)
  assert diffusion.TRACE_COUNTS["sample_batch"] - before == 1
  run(schedule.respace(sched, 100), w_T)  # another K: another program
  assert diffusion.TRACE_COUNTS["sample_batch"] - before == 2
  w0, trajectory = diffusion.sample_batch(model, variables, schedule.respace(sched, 50), w_T,
                                          support, labels, trajectory_every=10)
  assert trajectory.shape == (3, 6, 4, 24)
  np.testing.assert_array_equal(trajectory[:, -1], w0)
  with pytest.raises(ValueError, match="dividing the schedule's 50 steps"):
    diffusion.sample_batch(model, variables, schedule.respace(sched, 50), w_T, support, labels,
                           trajectory_every=7)
