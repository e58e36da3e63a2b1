import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadiff_jax import schedule

REF_FIELDS = ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
              "remove_noise_coeff", "reciprocal_sqrt_alphas")


@pytest.mark.parametrize("field", REF_FIELDS)
def test_linear_schedule_matches_reference(ref, ref_schedule, field):
  actual = np.asarray(getattr(ref_schedule, field))
  assert actual.dtype == np.float32
  np.testing.assert_allclose(actual, ref[f"schedule/{field}"], rtol=1e-6, atol=0)


def test_linear_schedule_formulas():
  sched = schedule.linear(num_steps=50, beta_start=1e-3, beta_end=0.05)
  betas = np.linspace(1e-3, 0.05, 50)
  abar = np.cumprod(1 - betas)
  assert sched.num_steps == 50
  np.testing.assert_allclose(sched.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(sched.alphas, 1 - betas, rtol=1e-6)
  np.testing.assert_allclose(sched.alphas_cumprod, abar, rtol=1e-6)
  np.testing.assert_allclose(sched.remove_noise_coeff, betas / np.sqrt(1 - abar), rtol=1e-5)
  np.testing.assert_allclose(sched.reciprocal_sqrt_alphas, 1 / np.sqrt(1 - betas), rtol=1e-6)
  np.testing.assert_allclose(sched.sigmas, np.sqrt(betas), rtol=1e-6)


def test_cosine_schedule():
  sched = schedule.cosine(num_steps=1000)
  s = 0.008
  f = lambda u: np.cos((u / 1000 + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(1000)
  expected_betas = np.minimum(1 - f(t + 1) / f(t), 0.999)
  np.testing.assert_allclose(sched.betas, expected_betas, rtol=1e-5)
  abar = np.asarray(sched.alphas_cumprod)
  assert np.all(np.diff(abar) < 0)
  # Without the clipping, abar_t is exactly f(t + 1) / f(0).
  np.testing.assert_allclose(abar[:900], (f(t + 1) / f(0))[:900], rtol=1e-4)


def test_schedule_is_a_pytree_with_static_length():
  sched = schedule.linear(num_steps=10)

  @jax.jit
  def last_coefficient(s):
    return s.remove_noise_coeff[s.num_steps - 1]

  assert jnp.allclose(last_coefficient(sched), sched.remove_noise_coeff[-1])
  assert len(jax.tree_util.tree_leaves(sched)) == len(schedule.Schedule._fields)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=10.0), "num_steps"),
    (dict(beta_start=0.0), "beta_start"),
    (dict(beta_start=0.1, beta_end=0.01), "beta_start"),
    (dict(beta_end=1.0), "beta_end"),
])
def test_linear_schedule_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedule.linear(**kwargs)


def test_from_config_rejects_unknown_schedule():
  import ml_collections
  config = ml_collections.ConfigDict(dict(schedule="quadratic", num_steps=10))
  with pytest.raises(ValueError, match="quadratic"):
    schedule.from_config(config)
