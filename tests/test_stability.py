"""The stabilised variants, the divergence diagnostics and the stability study (docs/STABILITY.md)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_pipeline import assert_written, finished_run, run_tiny
from metadiff_jax import config_lib, diffusion, embedding, method, schedule, tcunet
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import features
from metadiff_jax.errors import ConfigError, StageError
from metadiff_jax.stages import stability


def _init(model, ways, shots, dim=None):
  dim = dim or model.feature_dim
  return model.init(jax.random.key(0), jnp.zeros((ways, model.feature_dim)), 0,
                    jnp.zeros((ways * shots, dim)), jnp.repeat(jnp.arange(ways), shots))


def _episodes(rng, episodes, ways, shots, dim):
  support = jnp.asarray(rng.normal(size=(episodes, ways * shots, dim)) + 1.0, jnp.float32)
  labels = jnp.tile(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), shots), (episodes, 1))
  return support, labels


# ----------------------------------------------------------------------------- the variants

@pytest.mark.parametrize("inputs", [("gradient", "weights"), ("gradient", "means"),
                                    ("gradient", "weights", "means")])
def test_the_first_block_reads_the_named_inputs(inputs):
  dim, ways, shots = 8, 3, 2
  model = tcunet.TCUNet(feature_dim=dim, hidden_dims=(6, 4), time_embed_dim=8, inputs=inputs)
  variables = _init(model, ways, shots)
  assert variables["params"]["proto_inf1"]["kernel"].shape == (dim * len(inputs), 6)
  rng = np.random.default_rng(0)
  support, labels = _episodes(rng, 1, ways, shots, dim)
  w = jnp.asarray(rng.normal(size=(ways, dim)), jnp.float32)
  cond = tcunet.condition("prototype", "l2", support[0], labels[0], ways)
  grad = model.apply(variables, w, cond, method="support_gradient")
  x = model.apply(variables, w, grad, cond, method="network_input")
  parts = {"gradient": grad, "weights": w,
           "means": (support[0].reshape(ways, shots, dim)).mean(1)}
  np.testing.assert_allclose(np.asarray(x), np.concatenate([parts[i] for i in inputs], -1),
                             rtol=1e-6, atol=1e-6)
  # The full forward pass needs that input: the gradient alone is refused.
  time = model.apply(variables, 5, method="time_features")
  with pytest.raises(ValueError, match="needs its first block's input"):
    model.apply(variables, grad, time, method="from_gradient_and_time")


@pytest.mark.parametrize("kwargs,message", [
    ({"inputs": ("weights",)}, "must start with 'gradient'"),
    ({"inputs": ("gradient", "bias")}, "must start with 'gradient'"),
    ({"inputs": ("gradient", "means"), "head": "linear"}, "prototype-head input"),
    ({"prediction": "v"}, "unknown prediction"),
    ({"unet": False, "prediction": "x0"}, "without the UNet"),
])
def test_impossible_variants_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tcunet.TCUNet(feature_dim=8, **kwargs)


def _python_loop(model, variables, sched, w, support, labels, sampler="original", keys=None):
  """The reverse process one step at a time through `__call__`: the reference."""
  a, b, s = diffusion.update_coefficients(sched, sampler, model.prediction)
  for i in range(sched.num_steps - 1, -1, -1):
    out = jax.vmap(model.apply, in_axes=(None, 0, None, 0, 0))(
        variables, w, int(sched.timesteps[i]), support, labels)
    if sampler == "original" and model.prediction == "eps":
      w = diffusion.reverse_step(sched, w, out, i)
    else:
      w = a[i] * w + b[i] * out
    if sampler == "ddpm":
      w = w + s[i] * jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i),
                                                          w.shape[1:]))(keys)
  return w


@pytest.mark.parametrize("inputs,prediction,sampler", [
    (("gradient",), "eps", "ddim"), (("gradient",), "eps", "ddpm"),
    (("gradient", "weights"), "eps", "original"), (("gradient", "means"), "eps", "ddim"),
    (("gradient",), "x0", "original"), (("gradient", "weights", "means"), "x0", "ddpm"),
    (("gradient", "weights"), "x0_residual", "original"), (("gradient",), "x0_residual", "ddim"),
    (("gradient", "weights"), "x0_linear_prior", "original"),
    (("gradient", "means"), "x0_linear_prior", "ddpm"),
])
def test_the_sampler_of_each_variant_equals_a_python_loop(inputs, prediction, sampler):
  dim, ways, shots, episodes = 8, 3, 2, 2
  model = tcunet.TCUNet(feature_dim=dim, hidden_dims=(6, 4), time_embed_dim=8, inputs=inputs,
                        prediction=prediction)
  variables = _init(model, ways, shots)
  if prediction == "x0_linear_prior":  # a prior that is not the identity (it starts at it)
    params = dict(variables["params"])
    params["prior_kernel"] = 0.1 * jax.random.normal(jax.random.key(3), (dim, dim))
    params["prior_bias"] = jnp.full((dim,), 0.5)
    variables = {"params": params}
  sched = schedule.respace(schedule.linear(num_steps=40), 8)
  rng = np.random.default_rng(1)
  support, labels = _episodes(rng, episodes, ways, shots, dim)
  w_T = jnp.asarray(rng.normal(size=(episodes, ways, dim)), jnp.float32)
  keys = jax.random.split(jax.random.key(5), episodes)
  got = diffusion.sample_batch(model, variables, sched, w_T, support, labels, sampler=sampler,
                               noise_keys=keys)
  want = _python_loop(model, variables, sched, w_T, support, labels, sampler, keys)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
@pytest.mark.parametrize("prediction", tcunet.PREDICTIONS)
def test_every_update_lands_on_w0_under_an_exact_denoiser(sampler, prediction):
  """With the exact noise (or w0) of a known target, each update recovers the target."""
  sched = schedule.linear(num_steps=200)
  a, b, s = (np.asarray(x, np.float64) for x in
             diffusion.update_coefficients(sched, sampler, prediction))
  abar = np.asarray(sched.alphas_cumprod, np.float64)
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4, 6)) * 3
  w = rng.normal(size=(4, 6))
  for i in range(199, -1, -1):
    eps = (w - np.sqrt(abar[i]) * w0) / np.sqrt(1 - abar[i])
    out = eps if prediction == "eps" else w0
    w = a[i] * w + b[i] * out + s[i] * rng.normal(size=w.shape)
  # DDPM adds fresh noise down to step 1; its last step is noiseless.
  tol = 0.1 if sampler == "ddpm" else 1e-3
  np.testing.assert_allclose(w, w0, atol=tol * 3)
  assert s[0] == 0 and (np.all(s == 0) or sampler == "ddpm")


def test_the_residual_predictions_correct_the_support_means():
  """x0 = m_hat + (out - g) for "x0_residual", and m_hat + m_hat L + c + (out - g) for
  "x0_linear_prior", with `out` the eps-model's output under the same layers."""
  dim, ways, shots = 8, 3, 2
  inputs = ("gradient", "weights")
  kwargs = dict(feature_dim=dim, hidden_dims=(6, 4), time_embed_dim=8, inputs=inputs,
                loss_reduction="shot_mean")
  eps_model = tcunet.TCUNet(**kwargs)
  residual = tcunet.TCUNet(**kwargs, prediction="x0_residual")
  linear = tcunet.TCUNet(**kwargs, prediction="x0_linear_prior")
  variables = _init(eps_model, ways, shots)
  rng = np.random.default_rng(4)
  support, labels = _episodes(rng, 1, ways, shots, dim)
  w = jnp.asarray(rng.normal(size=(ways, dim)), jnp.float32)
  means = support[0].reshape(ways, shots, dim).mean(1)
  out = eps_model.apply(variables, w, 7, support[0], labels[0])
  grad = 2 * (w - means)  # shot_mean: 2 (w - m_hat) per class
  want = means + out - grad
  np.testing.assert_allclose(np.asarray(residual.apply(variables, w, 7, support[0], labels[0])),
                             np.asarray(want), rtol=1e-5, atol=1e-5)
  # The linear prior starts at the identity (L = 0, c = 0), and is m_hat (I + L) + c after.
  lin_vars = _init(linear, ways, shots)
  assert set(lin_vars["params"]) == set(variables["params"]) | {"prior_kernel", "prior_bias"}
  assert not np.any(lin_vars["params"]["prior_kernel"]) and not np.any(
      lin_vars["params"]["prior_bias"])
  kernel = jnp.asarray(rng.normal(size=(dim, dim)) * 0.1, jnp.float32)
  bias = jnp.asarray(rng.normal(size=dim), jnp.float32)
  params = {**variables["params"], "prior_kernel": kernel, "prior_bias": bias}
  got = linear.apply({"params": params}, w, 7, support[0], labels[0])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want + means @ kernel + bias),
                             rtol=1e-4, atol=1e-4)
  # Prototype weights only: the linear head has no class means to correct.
  with pytest.raises(ValueError, match="prototype-head weights"):
    tcunet.TCUNet(feature_dim=dim + 1, head="linear", prediction="x0_residual")


def test_ddpm_noise_is_drawn_per_episode_from_its_key():
  dim, ways, shots = 8, 3, 1
  model = tcunet.TCUNet(feature_dim=dim, hidden_dims=(6, 4), time_embed_dim=8)
  variables = _init(model, ways, shots)
  sched = schedule.linear(num_steps=10)
  rng = np.random.default_rng(2)
  support, labels = _episodes(rng, 3, ways, shots, dim)
  w_T = jnp.asarray(rng.normal(size=(3, ways, dim)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 3)
  run = lambda k: np.asarray(diffusion.sample_batch(model, variables, sched, w_T, support,
                                                    labels, sampler="ddpm", noise_keys=k))
  first = run(keys)
  np.testing.assert_array_equal(first, run(keys))
  other = run(jax.random.split(jax.random.key(1), 3))
  assert not np.allclose(first, other)
  # Episode 0 alone, with its own key, is episode 0 of the batch.
  one = diffusion.sample(model, variables, sched, w_T[0], support[0], labels[0],
                         sampler="ddpm", noise_key=keys[0])
  np.testing.assert_allclose(np.asarray(one), first[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="ddpm sampler draws noise"):
    diffusion.sample_batch(model, variables, sched, w_T, support, labels, sampler="ddpm")
  with pytest.raises(ValueError, match="unknown sampler"):
    diffusion.sample_batch(model, variables, sched, w_T, support, labels, sampler="euler")


def test_the_x0_loss_regresses_w0():
  dim, ways, shots, episodes = 8, 3, 2, 4
  model = tcunet.TCUNet(feature_dim=dim, hidden_dims=(6, 4), time_embed_dim=8, prediction="x0")
  variables = _init(model, ways, shots)
  sched = schedule.linear(num_steps=50)
  rng = np.random.default_rng(3)
  support, labels = _episodes(rng, episodes, ways, shots, dim)
  w0 = jnp.asarray(rng.normal(size=(episodes, ways, dim)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=w0.shape), jnp.float32)
  t = jnp.asarray([0, 10, 30, 49], jnp.int32)
  w_t = diffusion.q_sample(sched, w0, t, noise)
  out = jax.vmap(model.apply, in_axes=(None, 0, 0, 0, 0))(variables, w_t, t, support, labels)
  loss = diffusion.loss_from_noise(model, variables, sched, w0, support, labels, t, noise)
  np.testing.assert_allclose(float(loss), float(jnp.mean((out - w0) ** 2)), rtol=1e-6)
  # The diagnostic compares in noise space: the noise the x0 estimate implies.
  err = diffusion.noise_error(model, variables, sched, w0, support, labels, t, noise)
  implied = (w_t - sched.sqrt_alphas_cumprod[t][:, None, None] * out) / \
      sched.sqrt_one_minus_alphas_cumprod[t][:, None, None]
  np.testing.assert_allclose(np.asarray(err), np.asarray(jnp.mean((implied - noise) ** 2,
                                                                  axis=(1, 2))), rtol=1e-5)


# ----------------------------------------------------------------------------- diagnostics

def test_the_trajectory_norm_diagnostic_on_a_case_with_known_norms():
  """eps = g (no UNet) makes the reverse process linear: its norms are known in closed form."""
  dim, ways, shots, queries = 6, 2, 3, 2
  model = tcunet.TCUNet(feature_dim=dim, unet=False)
  sched = schedule.linear(num_steps=20, beta_start=1e-3, beta_end=0.2)
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(40, dim)).astype(np.float32) + 2.0
  support_idx = np.arange(ways * shots, dtype=np.int32)[None]
  support_labels = np.repeat(np.arange(ways, dtype=np.int32), shots)[None]
  query_idx = np.arange(20, 20 + ways * queries, dtype=np.int32)[None]
  query_labels = np.repeat(np.arange(ways, dtype=np.int32), queries)[None]
  index, key = np.zeros(1, np.int32), jax.random.key(7)
  m = method.trajectory_metrics(model, {}, sched, jnp.asarray(feats), support_idx,
                                support_labels, query_idx, query_labels, index, key,
                                ways=ways, every=5)
  # The same w_T, then w <- (w - c_t 2K (w - m)) / sqrt(alpha_t) by hand, in float64.
  w = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (ways, dim)), np.float64)
  means = feats[:ways * shots].reshape(ways, shots, dim).mean(1).astype(np.float64)
  c = np.asarray(sched.remove_noise_coeff, np.float64)
  r = np.asarray(sched.reciprocal_sqrt_alphas, np.float64)
  norms = [np.linalg.norm(w, axis=1).mean()]
  for n, i in enumerate(range(19, -1, -1)):
    w = (w - c[i] * 2 * shots * (w - means)) * r[i]
    if (n + 1) % 5 == 0:
      norms.append(np.linalg.norm(w, axis=1).mean())
  reference = np.linalg.norm(means, axis=1).mean()
  np.testing.assert_allclose(np.asarray(m["reference_norm"]), [reference], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(m["norm"][0]), norms, rtol=1e-4)

  # `stability._trajectory` turns these into ratios beside the on-track norm.
  from metadiff_jax.data import episodes as episodes_lib
  labels = np.repeat(np.arange(4), 10).astype(np.int32)
  sampler = episodes_lib.EpisodeSampler(labels, ways, shots, queries, 0, "test")
  metadiff = dataclasses.replace(
      method.MetaDiff.from_config(config_lib.base_config(), dim), model=model,
      sample_schedule=sched, sampler={"dtype": None, "precision": None, "update": "original"})
  out = stability._trajectory(metadiff, {}, jnp.asarray(feats), sampler, 3, 4, key, every=5)
  assert out["steps"] == [0, 5, 10, 15, 20]
  assert out["on_track_norm_ratio"][-1] == pytest.approx(1.0)  # abar = 1 once all are taken
  # At the start the on-track norm is the noise's, sqrt(W) per row, and these support means
  # (features around 2 in each of W = 6 coordinates) are longer than that.
  assert 0.3 < out["on_track_norm_ratio"][0] < 1.0
  assert len(out["norm_ratio"]) == 5 and np.all(np.isfinite(out["norm_ratio"]))


def test_the_held_out_noise_error_against_its_fixed_predictors():
  """Classes whose images are all alike: their support means are their targets exactly."""
  dim, ways, shots, classes = 16, 3, 2, 6
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(classes, dim)).astype(np.float32)
  labels = np.repeat(np.arange(classes), 8).astype(np.int32)
  fs = features.FeatureSet(features=centres[labels], labels=labels, num_classes=classes,
                           key="k")
  from metadiff_jax.data import episodes as episodes_lib
  sampler = episodes_lib.EpisodeSampler(labels, ways, shots, 2, 0, "test")
  model = tcunet.TCUNet(feature_dim=dim, unet=False)
  sched = schedule.linear(num_steps=100)
  table = method.noise_error_table(model, {}, sched, fs, centres, sampler, 40, 16,
                                   jax.random.key(0), buckets=4)
  assert table["steps"] == [[0, 25], [25, 50], [50, 75], [75, 100]]
  np.testing.assert_allclose(table["support_means"], 0.0, atol=1e-6)
  np.testing.assert_allclose(table["zero"], 1.0, atol=0.1)
  assert np.all(np.isfinite(table["model"])) and min(table["model"]) > 0


# ----------------------------------------------------------------------------- configs

def test_variant_presets_set_and_name_the_fields():
  config = config_lib.base_config()
  assert config_lib.variant_of(config) == config_lib.RECOMMENDED
  for name in config_lib.VARIANTS:
    config_lib.apply_variant(config, name)
    assert config_lib.variant_of(config) == name
  config_lib.apply_variant(config, "faithful")
  assert tuple(config.denoiser.inputs) == ("gradient",)
  assert config.denoiser.prediction == "eps" and config.diffusion.sampler == "original"
  assert config.diffusion.feature_rms is None and config.denoiser.loss_reduction == "sum"
  with pytest.raises(ConfigError, match="unknown variant"):
    config_lib.apply_variant(config, "stable")


def test_the_default_samples_a_linear_prior_in_ten_steps_and_its_ablations_predict_noise():
  from metadiff_jax.stages import analysis
  config = config_lib.base_config()
  assert config_lib.RECOMMENDED == "linear_prior"
  assert config.denoiser.prediction == "x0_linear_prior"
  assert config.diffusion.num_sampling_steps == 10 and config.diffusion.feature_rms == 1.0
  config_lib.apply_variant(config, "linear_prior_full")
  assert config.diffusion.num_sampling_steps is None
  config_lib.apply_variant(config, "linear_prior")
  # Table 3's w/o UNet has no layers and Table 4's linear head no class means to correct:
  # those ablations predict the noise; the cosine-CE one keeps the default's prediction.
  assert analysis.variant_config(config, "no_unet").denoiser.prediction == "eps"
  assert analysis.variant_config(config, "linear_metadiff").denoiser.prediction == "eps"
  assert analysis.variant_config(config, "cosine_ce").denoiser.prediction == "x0_linear_prior"
  # Rows of other lengths, and the directory of a denoiser validated with respaced steps.
  config.stability.lengths = (500,)
  config.stability.length_variants = ("linear_prior",)
  rows = stability.rows_of(config)
  assert ("linear_prior@steps=500", "linear_prior", 1e-4, 500) in rows
  long = stability.variant_config(config, "linear_prior", 1e-4, 500)
  assert long.train.steps == 500 and long.train.val_every_steps == 25
  assert long.train.checkpoint_every_steps == 25
  assert stability.denoiser_dir("/w", long, 1).endswith(
      "gradient+weights_x0_linear_prior_sum_rms1_k10_lr0.0001_steps500")


def test_feature_rescaling_and_its_targets(tmp_path):
  config = config_lib.base_config()
  config_lib.apply_variant(config, "normalized")
  rng = np.random.default_rng(6)
  labels = np.repeat(np.arange(3), 4).astype(np.int32)
  fs = features.FeatureSet(features=rng.normal(size=(12, 9)).astype(np.float32) * 5,
                           labels=labels, num_classes=3, key="abc")
  out = embedding.diffusion_features(config, fs)
  np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 3.0, rtol=1e-5)  # 1 * sqrt(9)
  assert out.key != fs.key
  with pytest.raises(StageError, match="run the prototypes stage first"):
    workdir_lib.diffusion_targets(config, "/nonexistent", out)
  workdir = tmp_path / "run"
  (workdir / "prototypes").mkdir(parents=True)
  (workdir / "prototypes" / "targets.npz").write_bytes(b"")  # the stage ran
  targets = workdir_lib.diffusion_targets(config, str(workdir), out)
  np.testing.assert_allclose(targets, out.features.reshape(3, 4, 9).mean(1), rtol=1e-5)
  config_lib.apply_variant(config, "faithful")
  assert embedding.diffusion_features(config, fs) is fs


# ----------------------------------------------------------------------------- the study

TINY_STABILITY = [
    "--config.stability.episodes=16", "--config.stability.steps=10",
    "--config.stability.diagnostic_episodes=8", "--config.stability.diagnostic_buckets=5",
    "--config.stability.trajectory_every=2", "--config.stability.learning_rates=(1e-3,)",
    "--config.stability.val_every_steps=5",
    # A subset of the variants, one of each kind (the unit tests above cover every sampler
    # and prediction): sampler-only, another input, rescaled features, the shot mean, and the
    # default (x0 with a learned linear prior, respaced), also trained twice as long.
    "--config.stability.variants=('faithful', 'ddpm', 'weights', 'weights_normalized', "
    "'weights_normalized_shot_mean', 'linear_prior')",
    "--config.stability.lr_variants=('faithful', 'weights_normalized')",
    "--config.stability.lengths=(20,)",
]


STUDY = "stability.py:dataset=glyphs"

# `studied`: (workdir, process) where the whole study command has run.
studied_fixture = finished_run("studied", STUDY, *TINY_STABILITY)


def test_every_variant_trains_samples_and_is_reported(studied):
  workdir, proc = studied
  out = os.path.join(workdir, "stability")
  assert_written(out, ("stability.md", "stability.json", "1shot.png"))
  report = json.load(open(os.path.join(out, "stability.json")))
  rows = report["results"]["1"]
  variants = ("faithful", "ddpm", "weights", "weights_normalized",
              "weights_normalized_shot_mean", "linear_prior")
  extra = ("faithful@lr=0.001", "weights_normalized@lr=0.001")
  assert set(rows) == {"class_means", "shrinkage", "transductive", "shrinkage_transductive",
                       *variants, *extra,
                       "linear_prior@steps=20"}
  for name in (*variants, *extra, "linear_prior@steps=20"):
    r = rows[name]
    for which in ("best", "last", "untrained"):
      assert r[which]["n"] == 16 and 0.0 <= r[which]["mean"] <= 1.0, (name, which)
      assert np.isfinite(r[which]["norm_ratio"]), (name, which)
    if name.endswith("@steps=20"):  # every 20 / 20 steps, at the 5-step calls' ends
      assert r["training"]["steps"] == [5, 10, 15, 20] and r["last_step"] == 20
    else:
      assert r["training"]["steps"] == [5, 10], name  # validated every 5 of 10 steps
      assert r["last_step"] == 10 and r["best_step"] in (0, 5, 10)
    # T = 10 reverse steps, a point every 2 (the default samples in 10 respaced ones too).
    assert len(r["trajectory"]["norm_ratio"]) == 6
    assert len(r["noise_error"]["last"]) == 5
  assert 0.0 <= rows["shrinkage"]["mean"] <= 1.0 and rows["shrinkage"]["n"] == 16
  # Variants that change only the sampler share the faithful denoiser, and so does the
  # class-mean row's reference; the sampler changes the numbers' settings.
  for name in ("ddpm",):
    assert rows[name]["settings"]["denoisers"] == rows["faithful"]["settings"]["denoisers"]
  assert rows["weights"]["settings"]["denoisers"] != rows["faithful"]["settings"]["denoisers"]
  # At 1-shot the per-class mean of Eq. 11 is its sum: one denoiser serves both rows.
  assert (rows["weights_normalized_shot_mean"]["settings"]["denoisers"]
          == rows["weights_normalized"]["settings"]["denoisers"])
  assert rows["faithful@lr=0.001"]["settings"]["learning_rate"] == 0.001
  text = open(os.path.join(out, "stability.md")).read()
  assert "| class-mean prototypes |" in text and "| faithful@lr=0.001 |" in text
  assert "| linear shrinkage (no diffusion) |" in text and "| linear_prior@steps=20 |" in text
  assert "| class-mean prototypes |" in proc.stdout


def test_the_faithful_row_is_the_eval_stage_on_the_same_denoiser(studied, data_dir):
  """Same denoiser, episodes and key: the study's faithful row equals the eval stage."""
  workdir, _ = studied
  rows = json.load(open(os.path.join(workdir, "stability", "stability.json")))["results"]["1"]
  where = [d for d in os.listdir(os.path.join(workdir, "stability", "denoisers"))
           if d.startswith("gradient_eps_sum_lr0.0001")][0]
  denoiser_dir = os.path.join(workdir, "stability", "denoisers", where)
  os.symlink(os.path.join(workdir, "features"), os.path.join(denoiser_dir, "features"))
  os.symlink(os.path.join(workdir, "pretrain"), os.path.join(denoiser_dir, "pretrain"))
  run_tiny("glyphs_conv4.py:variant=faithful", denoiser_dir, data_dir,
           "--config.stages=('eval',)", "--config.eval.episodes=16")
  evaluated = json.load(open(os.path.join(denoiser_dir, "eval", "1shot.json")))
  assert rows["faithful"]["best"]["mean"] == pytest.approx(evaluated["metadiff"]["mean"],
                                                           abs=1e-9)
  assert rows["faithful"]["untrained"]["mean"] == pytest.approx(
      evaluated["untrained"]["mean"], abs=1e-9)
  # The eval stage reports the divergence diagnostic too.
  errors = evaluated["diagnostics"]["noise_error"]
  assert len(errors["metadiff"]) == 10 and len(errors["support_means"]) == 10


def test_a_second_study_run_reuses_every_row(studied, data_dir):
  workdir, _ = studied
  path = os.path.join(workdir, "stability", "stability.json")
  before = open(path).read()
  proc = run_tiny(STUDY, workdir, data_dir, *TINY_STABILITY)
  assert "train 1-shot: step" not in proc.stderr  # nothing trained again
  assert open(path).read() == before


# ----------------------------------------------------------------------------- divergence

def _relu_clusters(seed, classes, per, dim):
  """Non-negative class clusters, like ReLU features: centres 0.5 + |N(0, 1)|, spread 0.7."""
  rng = np.random.default_rng(seed)
  centres = 0.5 + np.abs(rng.normal(size=(classes, dim)))
  x = np.maximum(centres[:, None] + 0.7 * rng.normal(size=(classes, per, dim)), 0)
  labels = np.repeat(np.arange(classes), per).astype(np.int32)
  return features.FeatureSet(features=x.reshape(-1, dim).astype(np.float32), labels=labels,
                             num_classes=classes, key=f"relu{seed}")


def _train_and_sample(variant: str, steps: int = 2000):
  """A 1-shot denoiser of `variant` trained on synthetic base classes, sampled on held-out
  ones: (accuracy, norm ratio, class-mean accuracy), each the mean over 40 episodes."""
  from metadiff_jax.data import episodes as episodes_lib
  from metadiff_jax.train_state import DiffusionState, adam_l2
  config = config_lib.base_config()
  config_lib.apply_variant(config, variant)
  dim, ways, shots = 32, 5, 1
  base = embedding.diffusion_features(config, _relu_clusters(0, 64, 20, dim))
  test = embedding.diffusion_features(config, _relu_clusters(1, 16, 20, dim))
  targets = np.asarray(features.class_means(base.features, base.labels, base.num_classes))
  model = method.denoiser(config, dim)
  variables = _init(model, ways, shots)
  state = DiffusionState.create(apply_fn=model.apply, params=variables["params"],
                                tx=adam_l2(1e-3, 5e-4),
                                ema_params=jax.tree_util.tree_map(jnp.copy,
                                                                  variables["params"]))
  sched = schedule.linear(1000)
  state, losses = method.train_steps(
      model, state, sched, jnp.asarray(base.features), jnp.asarray(targets),
      episodes_lib.class_table(base.labels), jax.random.key(1), jax.random.key(2), steps, 8,
      ways, shots, 0.999, 100)
  assert np.all(np.isfinite(np.asarray(losses)))
  sampler = episodes_lib.EpisodeSampler(test.labels, ways, shots, 10, 0, "test")
  m = method.run_episodes(model, {"params": state.ema_params}, sched,
                          jnp.asarray(test.features), sampler, 40, 40, jax.random.key(3),
                          progress=False, **method.sampler_options(config))
  return (float(m["accuracy"].mean()), float(m["norm_ratio"].mean()),
          float(m["prototype_accuracy"].mean()))


@pytest.mark.slow  # trains two denoisers for 2,000 steps
def test_the_faithful_denoiser_diverges_where_the_recommended_one_does_not():
  """Synthetic ReLU-like features, 1-shot, Adam 1e-3: after 2,000 steps the faithful sampler's
  prototypes are several times the support means' norm and accuracy collapses; the
  recommended variant lands at the support means' scale and matches class means."""
  acc, ratio, class_means = _train_and_sample("faithful")
  assert ratio > 3.0 and acc < class_means - 0.2, (acc, ratio, class_means)
  acc, ratio, class_means = _train_and_sample(config_lib.RECOMMENDED)
  assert 0.7 < ratio < 1.3 and acc > class_means - 0.03, (acc, ratio, class_means)


def test_the_shot_mean_support_loss_does_not_grow_with_shots():
  from metadiff_jax import prototypes
  rng = np.random.default_rng(8)
  ways, dim = 3, 4
  w = jnp.asarray(rng.normal(size=(ways, dim)), jnp.float32)
  for shots in (1, 5):
    support = jnp.asarray(rng.normal(size=(ways * shots, dim)), jnp.float32)
    labels = jnp.repeat(jnp.arange(ways), shots)
    means = support.reshape(ways, shots, dim).mean(1)
    grad = prototypes.support_loss_grad(w, support, labels, "shot_mean")
    np.testing.assert_allclose(np.asarray(grad), 2 * np.asarray(w - means), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(jax.grad(prototypes.support_loss)(w, support, labels, "shot_mean")),
        np.asarray(grad), rtol=1e-5, atol=1e-5)
    sums = prototypes.support_loss_grad(w, support, labels, "sum")
    np.testing.assert_allclose(np.asarray(sums), shots * np.asarray(grad), rtol=1e-5,
                               atol=1e-5)


def test_the_screening_script_trains_and_compares_the_candidates(studied, data_dir, tmp_path):
  """benchmarks/stability_screen.py on the study's workdir: held-out targets, respaced
  samplers, averaged samples and the prior alone, written as JSON and Markdown."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).parent.parent
  sys.path.insert(0, str(repo / "benchmarks"))
  import stability_screen  # pylint: disable=g-import-not-at-top
  workdir, _ = studied
  out = tmp_path / "screen.json"
  result = stability_screen.main([
      "--config", str(repo / "configs" / "glyphs_conv4.py"), "--config_arg", "tiny=1",
      "--override", f"data.data_dir={data_dir}", "--workdir", workdir, "--steps", "4",
      "--every", "2", "--episodes", "8", "--targets", "held_out", "--sampling_steps", "1,T",
      "--average", "1,2", "--out", str(out)])
  assert [c["step"] for c in result["curve"]] == [0, 2, 4]
  assert set(result["final"]) == {"sampling_steps=1", "sampling_steps=T", "average=1",
                                  "average=2", "prior_only"}
  for r in (*result["final"].values(), *(c["accuracy"] for c in result["curve"])):
    assert r["n"] == 8 and 0.0 <= r["mean"] <= 1.0
  # One sample from the evaluation's own w_T is the evaluation, in another compiled program:
  # equal up to queries whose two best scores the rounding can swap.
  assert abs(result["final"]["average=1"]["mean"] - result["curve"][-1]["accuracy"]["mean"]) \
      < 0.05
  assert json.loads(out.read_text())["targets"] == "held_out"
  assert "| prior_only |" in out.with_suffix(".md").read_text()
