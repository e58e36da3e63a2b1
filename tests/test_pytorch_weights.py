import sys

import jax
import numpy as np
import pytest

from conftest import episode
from metadiff_jax import schedule, tcunet, pytorch_weights


def wrap(state_dict, prefix):
  return {prefix + k: v for k, v in state_dict.items()}


def schedule_buffers(sched):
  return {name: np.asarray(getattr(sched, name)) for name in (
      "betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
      "reciprocal_sqrt_alphas", "remove_noise_coeff")} | {"sigma": np.asarray(sched.sigmas)}


def assert_same_params(actual, expected):
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_e = dict(jax.tree_util.tree_leaves_with_path(expected))
  assert len(flat_a) == len(flat_e) == 24
  for path, leaf in flat_a:
    np.testing.assert_array_equal(leaf, flat_e[path])


def test_kernels_are_transposed_weights(ref_state_dict):
  params = pytorch_weights.tcunet_params_from_torch(ref_state_dict)
  np.testing.assert_array_equal(params["time_scale_0"]["kernel"],
                                ref_state_dict["time_scale.0.weight"].T)
  np.testing.assert_array_equal(params["proto_inf5"]["bias"], ref_state_dict["proto_inf5.bias"])
  assert pytorch_weights.tcunet_config_from_params(params) == dict(
      feature_dim=512, hidden_dims=(256, 128), time_embed_dim=320)


@pytest.mark.parametrize("layout", [
    "{name}", "module.{name}", "model.{name}", "module.model.{name}", "model.module.{name}"])
def test_every_key_layout(ref_state_dict, ref_schedule, layout):
  expected = pytorch_weights.tcunet_params_from_torch(ref_state_dict)
  state_dict = {layout.format(name=k): v for k, v in ref_state_dict.items()}
  if "model" in layout:  # a whole checkpoint: an (untrained) EMA copy and schedule buffers too
    state_dict |= {layout.format(name=k).replace("model.", "ema_model."): v * 0
                   for k, v in ref_state_dict.items()}
    state_dict |= schedule_buffers(ref_schedule)
  params = pytorch_weights.tcunet_params_from_torch(state_dict, schedule=ref_schedule)
  assert_same_params(params, expected)


def test_use_ema_takes_the_ema_copy(ref_state_dict):
  state_dict = wrap(ref_state_dict, "model.") | wrap(
      {k: v + 1 for k, v in ref_state_dict.items()}, "ema_model.")
  ema = pytorch_weights.tcunet_params_from_torch(state_dict, use_ema=True)
  np.testing.assert_array_equal(ema["time_emb3"]["bias"], ref_state_dict["time_emb3.bias"] + 1)
  plain = pytorch_weights.tcunet_params_from_torch(state_dict)
  np.testing.assert_array_equal(plain["time_emb3"]["bias"], ref_state_dict["time_emb3.bias"])
  with pytest.raises(KeyError, match="no `ema_model"):
    pytorch_weights.tcunet_params_from_torch(wrap(ref_state_dict, "model."), use_ema=True)


def test_imported_params_reproduce_the_reference_output(ref, ref_state_dict):
  params = pytorch_weights.tcunet_params_from_torch(wrap(ref_state_dict, "module.model."))
  model = tcunet.TCUNet(**pytorch_weights.tcunet_config_from_params(params))
  eps = model.apply({"params": params}, episode(ref, 1, "eps_w")[2], episode(ref, 1, "eps_t")[2],
                    episode(ref, 1, "support")[2], episode(ref, 1, "support_labels")[2])
  np.testing.assert_allclose(eps, ref["k1/eps_out"][2], atol=1e-4 * np.abs(ref["k1/eps_out"]).max())


def test_errors(ref_state_dict, ref_schedule):
  missing = {k: v for k, v in ref_state_dict.items() if not k.startswith("proto_inf4")}
  with pytest.raises(KeyError, match="proto_inf4.weight"):
    pytorch_weights.tcunet_params_from_torch(missing)
  with pytest.raises(KeyError, match="unexpected.*extra.weight"):
    pytorch_weights.tcunet_params_from_torch(ref_state_dict | {"extra.weight": np.zeros((2, 2))})
  bad_bias = ref_state_dict | {"time_emb1.bias": np.zeros(3)}
  with pytest.raises(ValueError, match="time_emb1"):
    pytorch_weights.tcunet_params_from_torch(bad_bias)
  other_schedule = schedule_buffers(schedule.linear(num_steps=1000, beta_end=0.03))
  with pytest.raises(ValueError, match="schedule buffer `betas`"):
    pytorch_weights.tcunet_params_from_torch(ref_state_dict | other_schedule, schedule=ref_schedule)


def test_npz_file(tmp_path, ref_state_dict):
  path = tmp_path / "head.npz"
  np.savez(path, **wrap(ref_state_dict, "model."))
  assert_same_params(pytorch_weights.tcunet_params_from_torch_file(path),
                     pytorch_weights.tcunet_params_from_torch(ref_state_dict))


def test_pth_without_torch_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match=r"needs PyTorch.*metadiff_jax\[torch\]"):
    pytorch_weights.tcunet_params_from_torch_file(tmp_path / "head.pth")


def test_pth_file_and_torch_tensors(tmp_path, ref_state_dict):
  torch = pytest.importorskip(
      "torch", reason="PyTorch is an optional extra; .pth reading is tested where it imports")
  state_dict = {k: torch.from_numpy(v) for k, v in wrap(ref_state_dict, "module.model.").items()}
  expected = pytorch_weights.tcunet_params_from_torch(ref_state_dict)
  assert_same_params(pytorch_weights.tcunet_params_from_torch(state_dict), expected)
  path = tmp_path / "head.pth"
  torch.save({"state_dict": state_dict, "epoch": 3}, path)
  assert_same_params(pytorch_weights.tcunet_params_from_torch_file(path), expected)


def test_corrupt_or_missing_files(tmp_path):
  broken = tmp_path / "head.npz"
  broken.write_bytes(b"not a zip archive")
  with pytest.raises(ValueError, match="cannot read .*head.npz as an .npz archive"):
    pytorch_weights.tcunet_params_from_torch_file(broken)
  with pytest.raises(FileNotFoundError):
    pytorch_weights.tcunet_params_from_torch_file(tmp_path / "absent.npz")


def test_corrupt_pth_file(tmp_path):
  pytest.importorskip(
      "torch", reason="PyTorch is an optional extra; .pth reading is tested where it imports")
  broken = tmp_path / "head.pth"
  broken.write_bytes(b"\x80\x02garbage")
  with pytest.raises(ValueError, match="cannot read .*head.pth as a PyTorch checkpoint"):
    pytorch_weights.tcunet_params_from_torch_file(broken)
