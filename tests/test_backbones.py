"""Backbones against the original PyTorch ResNet12 (tests/data/official_resnet12_vectors.npz)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from conftest import assert_close_to_scale
from metadiff_jax import backbones, pytorch_weights


SMALL_WIDTHS = (4, 6, 8, 10)


@pytest.fixture(scope="module")
def resnet_template():
  """Shapes of the variables of the reference ResNet12 (no compute)."""
  return jax.eval_shape(backbones.make("resnet12").init, jax.random.key(0),
                        jnp.zeros((1, 84, 84, 3)))


def numpy_variables(model, images, seed=0):
  """Random variables for `model`, drawn with numpy.

  `model.init` compiles a jax.random sampler per kernel shape, a second or more each on a
  2-core CPU; these tests need weights, not that initialiser (Conv4's test runs it).
  """
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if len(leaf.shape) == 4:  # HWIO kernel
      return rng.standard_normal(leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:3]))
    return 0.75 + 0.5 * rng.random(leaf.shape)  # BatchNorm scale, bias, mean, var

  template = jax.eval_shape(model.init, jax.random.key(0), images)
  return jax.tree.map(lambda leaf: draw(leaf).astype(np.float32), template)


def train_step_features(model):
  """features, batch_stats updates of a training-mode apply, compiled.

  One compiled program is several times faster to build than the op-by-op dispatch of a
  training-mode apply (BatchNorm statistics, DropBlock masks).
  """
  return jax.jit(lambda variables, images, seed: model.apply(
      variables, images, train=True, mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(seed)}))


def small_resnet(**kwargs):
  model = backbones.ResNet12(widths=SMALL_WIDTHS, **kwargs)
  images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 3)), jnp.float32)
  return model, numpy_variables(model, images), images


@pytest.mark.parametrize("prefix", ["", "module."])
def test_resnet12_matches_reference(resnet_ref, resnet_state_dict, prefix):
  variables = pytorch_weights.resnet12_variables_from_torch(
      {prefix + k: v for k, v in resnet_state_dict.items()})
  model = backbones.make("resnet12")
  images = jnp.asarray(resnet_ref["input_nchw"].transpose(0, 2, 3, 1))
  feature_map = model.apply(variables, images, method=backbones.ResNet12.feature_map)
  assert_close_to_scale(feature_map, resnet_ref["feature_map_nchw"].transpose(0, 2, 3, 1), 1e-4)
  features = model.apply(variables, images)
  assert_close_to_scale(features, resnet_ref["features"], 1e-4)


def test_parameter_tree_mirrors_the_torch_names(resnet_state_dict, resnet_template):
  assert set(resnet_template["params"]) == {f"layer{i}" for i in range(1, 5)}
  assert set(resnet_template["params"]["layer1"]) == {
      "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"}
  variables = pytorch_weights.resnet12_variables_from_torch(resnet_state_dict)
  pytorch_weights.check_variables_fit(resnet_template, variables)  # all 80 entries, no more
  np.testing.assert_array_equal(variables["params"]["layer2"]["conv3"]["kernel"],
                                resnet_state_dict["layer2.conv3.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["layer4"]["downsample_bn"]["var"],
                                resnet_state_dict["layer4.downsample.1.running_var"])


def test_activate_last_applies_leaky_relu_to_the_last_map():
  model, variables, images = small_resnet()
  activated = backbones.ResNet12(widths=SMALL_WIDTHS, activate_last=True)
  plain_map, activated_map = (
      jax.jit(lambda v, x, m=m: m.apply(v, x, method=backbones.ResNet12.feature_map))(
          variables, images) for m in (model, activated))
  # Max-pooling commutes with a monotone activation, so the maps differ by exactly that.
  np.testing.assert_allclose(activated_map, jax.nn.leaky_relu(plain_map, 0.1),
                             rtol=1e-6, atol=1e-6)
  assert float(plain_map.min()) < 0
  assert not np.allclose(activated_map.mean(axis=(1, 2)), plain_map.mean(axis=(1, 2)))


def test_feature_dims_and_conv4_shapes():
  conv4 = backbones.make("conv4")
  apply = jax.jit(conv4.apply)
  images = jnp.ones((2, 84, 84, 3))
  variables = jax.jit(conv4.init)(jax.random.key(0), images)  # the real initialiser, once
  assert set(variables["params"]["layer4"]) == {"conv", "bn"}
  assert apply(variables, images).shape == (2, 1600)
  images = jnp.ones((2, 32, 32, 1))
  assert apply(numpy_variables(conv4, images), images).shape == (2, 256)
  assert backbones.feature_dim(conv4, (84, 84, 3)) == 1600
  assert backbones.feature_dim(conv4, (32, 32, 1)) == 256
  assert backbones.feature_dim(backbones.make("resnet12"), (84, 84, 3)) == 512
  assert backbones.feature_dim(backbones.make("resnet12_wide"), (84, 84, 3)) == 640


def test_make():
  wide = backbones.make("resnet12_wide")
  assert wide.widths == (64, 160, 320, 640) and wide.dropblock_rate == 0.1
  assert backbones.make("resnet12_wide", dropblock_rate=0.0).dropblock_rate == 0.0
  assert backbones.make("resnet12", widths=[8, 8, 8, 8]).widths == (8, 8, 8, 8)
  assert backbones.make("conv4", width=32).width == 32
  with pytest.raises(ValueError, match="conv4, resnet12, resnet12_wide"):
    backbones.make("resnet18")


def test_drop_block_drops_whole_blocks_at_the_rate():
  x = jnp.ones((8, 20, 20, 16))
  drop = jax.jit(backbones.drop_block, static_argnums=(1, 2))
  out = np.asarray(drop(x, 0.1, 5, jax.random.key(3)))
  dropped = out == 0
  assert 0.05 < dropped.mean() < 0.15
  np.testing.assert_allclose(out.mean(), 1.0, rtol=1e-5)  # kept units rescaled
  assert np.allclose(out[~dropped], out[~dropped][0])
  # The dropped set is a union of 5x5 squares: opening it (erode, then dilate) changes nothing.
  full = sliding_window_view(dropped, (5, 5), axis=(1, 2)).all(axis=(-2, -1))
  padded = np.pad(full, ((0, 0), (4, 4), (4, 4), (0, 0)))
  opened = sliding_window_view(padded, (5, 5), axis=(1, 2)).any(axis=(-2, -1))
  np.testing.assert_array_equal(opened, dropped)


def test_dropblock_only_in_training_and_deterministic_per_key():
  model, variables, images = small_resnet(dropblock_rate=0.3, dropblock_size=2)
  no_drop = backbones.ResNet12(widths=SMALL_WIDTHS)
  np.testing.assert_array_equal(model.apply(variables, images), no_drop.apply(variables, images))

  train = train_step_features(model)
  features = np.asarray(train(variables, images, 5)[0])
  np.testing.assert_array_equal(train(variables, images, 5)[0], features)
  # Without DropBlock the key would not matter: a difference shows that units were dropped.
  assert not np.allclose(train(variables, images, 6)[0], features)
  with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
    jax.eval_shape(lambda: model.apply(variables, images, train=True, mutable=["batch_stats"]))


def test_wide_resnet12_trains_with_dropout_rng():
  wide = backbones.make("resnet12_wide")
  images = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 16, 3)), jnp.float32)
  variables = numpy_variables(wide, images)
  features, _ = train_step_features(wide)(variables, images, 1)
  assert features.shape == (2, 640)


def test_batch_norm_statistics_update_in_training():
  model, variables, images = small_resnet()
  _, updates = train_step_features(model)(variables, images, 0)
  kernel = variables["params"]["layer1"]["conv1"]["kernel"]
  conv1 = jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # PyTorch momentum 0.1: the new average is 0.9 * the old one + 0.1 * the batch mean.
  np.testing.assert_allclose(
      updates["batch_stats"]["layer1"]["bn1"]["mean"],
      0.9 * variables["batch_stats"]["layer1"]["bn1"]["mean"] + 0.1 * conv1.mean(axis=(0, 1, 2)),
      rtol=1e-5, atol=1e-6)
  for before, after in zip(jax.tree.leaves(variables["batch_stats"]),
                           jax.tree.leaves(updates["batch_stats"])):
    assert not np.allclose(before, after)


def test_import_errors(resnet_state_dict):
  missing = {k: v for k, v in resnet_state_dict.items() if k != "layer3.bn2.running_var"}
  with pytest.raises(KeyError, match=r"layer3\.bn2\.running_var"):
    pytorch_weights.resnet12_variables_from_torch(missing)
  extra = resnet_state_dict | {"fc.weight": np.zeros((5, 512)), "fc.bias": np.zeros(5),
                               "layer1.bn1.num_batches_tracked": np.array(7)}
  with pytest.raises(KeyError, match=r"unexpected.*\(2\).*fc\.bias.*fc\.weight"):
    pytorch_weights.resnet12_variables_from_torch(extra)


def test_check_variables_fit_names_the_first_mismatch(resnet_state_dict):
  wide = jax.eval_shape(backbones.make("resnet12_wide").init, jax.random.key(0),
                        jnp.zeros((1, 84, 84, 3)))
  variables = pytorch_weights.resnet12_variables_from_torch(resnet_state_dict)
  with pytest.raises(ValueError) as info:
    pytorch_weights.check_variables_fit(wide, variables, "ref.pth")
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("ref.pth has `params/layer2/bn1/bias` of shape (128,), but the "
                             "configured model expects (160,)")
  assert "config.backbone.name/widths" in message
  with pytest.raises(ValueError, match="has no `params/layer1/bn1/bias`"):
    pytorch_weights.check_variables_fit(variables, {"batch_stats": variables["batch_stats"]})
  extra = {**variables, "params": {**variables["params"], "extra": {"kernel": np.ones(2)}}}
  with pytest.raises(ValueError, match=r"`params/extra/kernel` of shape \(2,\), which the"):
    pytorch_weights.check_variables_fit(variables, extra)


def test_load_backbone_file_npz(tmp_path, resnet_state_dict, resnet_template):
  expected = pytorch_weights.resnet12_variables_from_torch(resnet_state_dict)
  path = tmp_path / "metadiff.npz"
  # A flattened {'embedding': DataParallel backbone, 'head': ...} checkpoint.
  np.savez(path, **{f"embedding.module.{k}": v for k, v in resnet_state_dict.items()},
           **{"head.model.proto_inf1.weight": np.zeros((256, 512), np.float32)})
  variables = pytorch_weights.load_backbone_file(path, resnet_template)
  for (path_a, a), (path_e, e) in zip(jax.tree_util.tree_leaves_with_path(variables),
                                      jax.tree_util.tree_leaves_with_path(expected)):
    assert path_a == path_e
    np.testing.assert_array_equal(a, e)
  wide = jax.eval_shape(backbones.make("resnet12_wide").init, jax.random.key(0),
                        jnp.zeros((1, 84, 84, 3)))
  with pytest.raises(ValueError, match=r"backbone checkpoint .*metadiff\.npz has `params/layer2"):
    pytorch_weights.load_backbone_file(path, wide)
  partial = tmp_path / "partial.npz"
  np.savez(partial, **{k: v for k, v in resnet_state_dict.items() if not k.startswith("layer4")})
  with pytest.raises(KeyError, match=r"partial\.npz: the state dict has no `layer4\.conv1"):
    pytorch_weights.load_backbone_file(partial, resnet_template)


def test_load_backbone_file_pth(tmp_path, resnet_state_dict, resnet_template):
  torch = pytest.importorskip(
      "torch", reason="PyTorch is an optional extra; .pth reading is tested where it imports")
  expected = pytorch_weights.resnet12_variables_from_torch(resnet_state_dict)
  embedding = {f"module.{k}": torch.from_numpy(v) for k, v in resnet_state_dict.items()}
  embedding["module.layer1.bn1.num_batches_tracked"] = torch.tensor(3)
  path = tmp_path / "metadiff.pth"
  torch.save({"embedding": embedding, "head": {"model.time_emb1.bias": torch.zeros(256)}}, path)
  variables = pytorch_weights.load_backbone_file(path, resnet_template)
  np.testing.assert_array_equal(variables["params"]["layer3"]["conv2"]["kernel"],
                                expected["params"]["layer3"]["conv2"]["kernel"])
  path = tmp_path / "trainer.pth"
  torch.save({"state_dict": embedding, "epoch": 90}, path)
  variables = pytorch_weights.load_backbone_file(path, resnet_template)
  np.testing.assert_array_equal(variables["batch_stats"]["layer4"]["bn3"]["mean"],
                                expected["batch_stats"]["layer4"]["bn3"]["mean"])
