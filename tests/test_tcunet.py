import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close_to_scale, episode
from metadiff_jax import prototypes, tcunet


@pytest.mark.parametrize("shots", [1, 5])
def test_denoiser_matches_reference(ref, ref_model, shots):
  model, variables = ref_model
  eps = jax.vmap(model.apply, in_axes=(None, 0, 0, 0, 0))(
      variables, episode(ref, shots, "eps_w"), episode(ref, shots, "eps_t"),
      episode(ref, shots, "support"), episode(ref, shots, "support_labels"))
  assert_close_to_scale(eps, ref[f"k{shots}/eps_out"], 1e-4)


def test_parameters_mirror_the_original_names_and_shapes(ref_state_dict):
  model = tcunet.TCUNet(feature_dim=512)
  variables = model.init(jax.random.key(0), jnp.zeros((5, 512)), 0, jnp.zeros((5, 512)),
                         jnp.arange(5))
  params = variables["params"]
  expected = {}
  for name, value in ref_state_dict.items():
    layer, kind = name.rsplit(".", 1)
    layer = layer.replace(".", "_")
    expected[(layer, "kernel" if kind == "weight" else "bias")] = value.T.shape
  actual = {(layer, kind): leaf.shape for layer, leaves in params.items()
            for kind, leaf in leaves.items()}
  assert actual == expected


def test_initialisation_follows_torch_linear():
  model = tcunet.TCUNet(feature_dim=512)
  params = model.init(jax.random.key(1), jnp.zeros((5, 512)), 0, jnp.zeros((5, 512)),
                      jnp.arange(5))["params"]
  kernel, bias = params["proto_inf1"]["kernel"], params["proto_inf1"]["bias"]
  bound = 1 / np.sqrt(512)
  assert float(jnp.abs(kernel).max()) <= bound and float(jnp.abs(bias).max()) <= bound
  # U(-b, b) has standard deviation b / sqrt(3).
  np.testing.assert_allclose(float(kernel.std()), bound / np.sqrt(3), rtol=0.02)


@pytest.mark.parametrize("num_classes, dim, shots", [(2, 64, 1), (10, 64, 5), (3, 96, 2)])
def test_other_sizes(num_classes, dim, shots):
  model = tcunet.TCUNet(feature_dim=dim, hidden_dims=(48, 24), time_embed_dim=32)
  rng = np.random.default_rng(0)
  w = rng.standard_normal((num_classes, dim)).astype(np.float32)
  support = rng.standard_normal((num_classes * shots, dim)).astype(np.float32)
  labels = np.repeat(np.arange(num_classes), shots)
  variables = model.init(jax.random.key(0), w, 3, support, labels)
  assert variables["params"]["proto_inf2"]["kernel"].shape == (48, 24)
  assert variables["params"]["time_emb5"]["kernel"].shape == (32, dim)
  eps = model.apply(variables, w, 3, support, labels)
  assert eps.shape == (num_classes, dim) and np.all(np.isfinite(eps))


def test_time_embedding_layout():
  e = tcunet.sinusoidal_time_embedding(417, 320)
  freqs = 10000.0 ** (-np.arange(160) / 160)
  np.testing.assert_allclose(e[:160], np.cos(417 * freqs), atol=2e-4)
  np.testing.assert_allclose(e[160:], np.sin(417 * freqs), atol=2e-4)


def test_call_equals_denoise_from_stats_and_gradient(ref, ref_model):
  model, variables = ref_model
  w, t = episode(ref, 5, "eps_w")[1], episode(ref, 5, "eps_t")[1]
  support, labels = episode(ref, 5, "support")[1], episode(ref, 5, "support_labels")[1]
  direct = model.apply(variables, w, t, support, labels)
  stats = prototypes.support_stats(support, labels, 5)
  via_stats = model.apply(variables, w, t, stats, method="denoise")
  grad = prototypes.support_loss_grad(w, support, labels)
  via_grad = model.apply(variables, grad, t, method="from_gradient")
  np.testing.assert_allclose(direct, via_stats, rtol=1e-6)
  np.testing.assert_allclose(direct, via_grad, rtol=1e-6)


def test_mean_reduction_feeds_the_mean_loss_gradient(ref, ref_model):
  model, variables = ref_model
  mean_model = model.clone(loss_reduction="mean")
  w, t = episode(ref, 5, "eps_w")[0], episode(ref, 5, "eps_t")[0]
  support, labels = episode(ref, 5, "support")[0], episode(ref, 5, "support_labels")[0]
  grad = prototypes.support_loss_grad(w, support, labels, reduction="mean")
  np.testing.assert_allclose(mean_model.apply(variables, w, t, support, labels),
                             model.apply(variables, grad, t, method="from_gradient"), rtol=1e-6)


@pytest.fixture(scope="module")
def small():
  model = tcunet.TCUNet(feature_dim=16, time_embed_dim=8)
  w, support, labels = jnp.zeros((3, 16)), jnp.ones((6, 16)), jnp.array([0, 1, 2, 0, 1, 2])
  return model, model.init(jax.random.key(0), w, 0, support, labels), w, support, labels


@pytest.mark.parametrize("change, exc, match", [
    (dict(w=jnp.zeros((3, 8))), ValueError, r"`w_t` must be \[N, D\].*16"),
    (dict(w=jnp.zeros((2, 3, 16))), ValueError, "`w_t`"),
    (dict(support=jnp.ones((6, 8))), ValueError, "feature dim 8"),
    (dict(support=jnp.ones((6,))), ValueError, "`support`"),
    (dict(labels=jnp.array([0, 1, 2])), ValueError, "support_labels"),
    (dict(labels=jnp.zeros(6)), TypeError, "integers"),
    (dict(t=0.5), TypeError, "`t` must be an integer scalar"),
    (dict(t=jnp.array([1, 2])), TypeError, "`t` must be an integer scalar"),
    (dict(labels=jnp.array([0, 1, 2, 3, 1, 2])), ValueError, r"\[0, 3\)"),
    (dict(labels=jnp.array([0, 1, 2, -1, 1, 2])), ValueError, r"\[0, 3\)"),
])
def test_bad_inputs_name_the_argument(small, change, exc, match):
  model, variables, w, support, labels = small
  args = dict(w=w, t=0, support=support, labels=labels) | change
  with pytest.raises(exc, match=match):
    model.apply(variables, args["w"], args["t"], args["support"], args["labels"])
  jitted = jax.jit(model.apply)
  if "labels" in change and change["labels"].dtype == jnp.int32 and change["labels"].size == 6:
    # Label values are unknown at trace time: out-of-range labels give NaN, not a wrong eps.
    assert np.all(np.isnan(jitted(variables, args["w"], 0, args["support"], args["labels"])))
  else:  # shape and dtype errors come at trace time, under jit too
    with pytest.raises(exc, match=match):
      jitted(variables, args["w"], args["t"], args["support"], args["labels"])


def test_hidden_dims_must_be_two_widths():
  with pytest.raises(ValueError, match=r"hidden_dims must be two widths"):
    tcunet.TCUNet(feature_dim=16, hidden_dims=(8, 4, 2))


def test_unknown_reduction_is_rejected(small):
  _, variables, w, support, labels = small
  with pytest.raises(ValueError, match="loss_reduction"):
    tcunet.TCUNet(feature_dim=16, time_embed_dim=8, loss_reduction="max").apply(
        variables, w, 0, support, labels)


def test_bfloat16_and_precision_options(ref, ref_model):
  model, variables = ref_model
  args = (episode(ref, 5, "eps_w")[1], episode(ref, 5, "eps_t")[1], episode(ref, 5, "support")[1],
          episode(ref, 5, "support_labels")[1])
  exact = model.clone(precision=jax.lax.Precision.HIGHEST).apply(variables, *args)
  assert_close_to_scale(exact, ref["k5/eps_out"][1], 1e-4)
  low = model.clone(dtype=jnp.bfloat16).apply(variables, *args)
  assert low.shape == exact.shape
  assert_close_to_scale(low, exact, 5e-2)  # bf16 keeps 8 bits of mantissa


def test_time_features_of_many_steps_and_the_split_forward_pass(ref, ref_model):
  model, variables = ref_model
  steps = jnp.array([0, 1, 417, 998, 999])
  batch = model.apply(variables, steps, method="time_features")
  assert batch.gate.shape == (5, 1)
  assert [e.shape for e in batch.scales] == [(5, h) for h in model.widths]
  for i, t in enumerate(steps):
    one = model.apply(variables, t, method="time_features")
    np.testing.assert_allclose(one.gate, batch.gate[i], rtol=1e-6, atol=1e-7)
    for e_one, e_batch in zip(one.scales, batch.scales):
      np.testing.assert_allclose(e_one, e_batch[i], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(tcunet.sinusoidal_time_embedding(steps, 320)[2],
                                tcunet.sinusoidal_time_embedding(417, 320))
  # from_gradient is time_features followed by from_gradient_and_time, bit for bit.
  w, t = episode(ref, 5, "eps_w")[1], episode(ref, 5, "eps_t")[1]
  support, labels = episode(ref, 5, "support")[1], episode(ref, 5, "support_labels")[1]
  grad = prototypes.support_loss_grad(w, support, labels)
  time = model.apply(variables, t, method="time_features")
  np.testing.assert_array_equal(
      model.apply(variables, grad, t, method="from_gradient"),
      model.apply(variables, grad, time, method="from_gradient_and_time"))


def test_denoise_from_time_runs_many_episodes_in_one_pass(ref, ref_model):
  model, variables = ref_model
  w, support = episode(ref, 5, "eps_w"), episode(ref, 5, "support")
  labels = episode(ref, 5, "support_labels")
  stats = jax.vmap(prototypes.support_stats, in_axes=(0, 0, None))(support, labels, 5)
  time = model.apply(variables, 417, method="time_features")
  for reduction in ("sum", "mean"):
    m = model.clone(loss_reduction=reduction)
    batch = m.apply(variables, w, time, stats, method="denoise_from_time")
    assert batch.shape == w.shape
    for b in range(w.shape[0]):
      np.testing.assert_allclose(batch[b], m.apply(variables, w[b], 417, support[b], labels[b]),
                                 rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"\[\.\.\., N, D\]"):
    model.apply(variables, w[..., :8], time, stats, method="denoise_from_time")


def test_a_gradient_cast_ahead_gives_the_same_eps(ref, ref_model):
  model, variables = ref_model
  w, t = episode(ref, 1, "eps_w"), episode(ref, 1, "eps_t")[0]
  stats = jax.vmap(prototypes.support_stats, in_axes=(0, 0, None))(
      episode(ref, 1, "support"), episode(ref, 1, "support_labels"), 5)
  for dtype in (None, jnp.bfloat16):
    m = model.clone(dtype=dtype)
    time = m.apply(variables, t, method="time_features")
    grad = m.apply(variables, w, stats, method="support_gradient")
    grad_in = grad if dtype is None else grad.astype(dtype)
    fn = lambda g_in: m.apply(variables, grad, time, g_in, method="from_gradient_and_time")
    np.testing.assert_array_equal(fn(grad_in), fn(None))
    assert fn(None).dtype == jnp.float32  # the gate and skip terms keep the float32 gradient
