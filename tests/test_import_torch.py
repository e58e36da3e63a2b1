"""`python -m metadiff_jax.import_torch`: PyTorch checkpoints written into a workdir.

The parameters are the reference ones: the original's head (the `param/*` entries of
tests/data/official_metadiff_vectors.npz) and the ResNet12 of the recipe of
tests/data/official_resnet12_vectors.npz (tests/resnet_recipe.py), in the layouts of the
original MetaDiff and of the other published ResNet12s (docs/IMPORTING.md). The imported
workdirs must reproduce the reference outputs and run the eval stage and `predict` unchanged.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, assert_close_to_scale, build_tiny, episode
from resnet_recipe import recipe_shape
from tiny_pipeline import cpu_env, run_main
from metadiff_jax import (backbones, checkpoint, config_lib, import_torch, pytorch_weights,
                          tcunet)
from metadiff_jax.data import augment
from metadiff_jax.import_torch import ImportCheckpointError

TORCH_REASON = "PyTorch is an optional extra; .pth reading is tested where it imports"


@pytest.fixture(scope="module")
def head_sd(ref):
  """The original head's wrapper: `model.*` the reference weights, `ema_model.*` another copy
  (+1, so that the two are told apart), and the schedule buffers of the original."""
  weights = {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}
  out = {f"model.{k}": v for k, v in weights.items()}
  out |= {f"ema_model.{k}": v + 1.0 for k, v in weights.items()}
  out |= {k[len("schedule/"):]: v for k, v in ref.items() if k.startswith("schedule/")}
  return out


def original_layout(resnet_state_dict, head_sd, module=True) -> dict:
  """The original MetaDiff's file: {'embedding': DataParallel backbone, 'head': wrapper}."""
  prefix = "module." if module else ""
  return {"embedding": {prefix + k: v for k, v in resnet_state_dict.items()}, "head": dict(head_sd)}


def flatten(layout: dict) -> dict:
  """A nested checkpoint as the flat names of an .npz (`embedding.module.layer1...`)."""
  return {f"{part}.{k}": v for part, tensors in layout.items() for k, v in tensors.items()}


def save_npz(path, tensors) -> str:
  np.savez(path, **tensors)
  return str(path)


def restored(directory):
  """(tree, metadata) of the checkpoint in `directory`, as saved."""
  latest = checkpoint.read_latest(directory)
  assert latest is not None, f"no checkpoint in {directory}"
  return latest


def assert_same_tree(actual, expected):
  flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(actual)}
  flat_e = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  assert flat_a.keys() == flat_e.keys()
  for key, value in flat_a.items():
    np.testing.assert_array_equal(np.asarray(value), flat_e[key], err_msg=key)


def expected_head(head_sd, ema=False):
  return pytorch_weights.tcunet_params_from_torch(head_sd, use_ema=ema)


def imported_features(workdir, images_nchw):
  """Features of the workdir's backbone, built from its config.json."""
  config = config_lib.load_workdir_config(workdir)
  tree, _ = restored(os.path.join(workdir, "pretrain", "best"))
  variables = {"params": tree["params"]["backbone"],
               "batch_stats": tree["batch_stats"]["backbone"]}
  model = backbones.make(config.backbone.name, activate_last=config.backbone.activate_last)
  return jax.jit(model.apply)(variables, np.asarray(images_nchw).transpose(0, 2, 3, 1))


def fake_head(feature_dim, hidden=(256, 128), time_dim=320):
  """Random head weights for features of another width (PyTorch names and layouts)."""
  rng = np.random.default_rng(0)
  h1, h2 = hidden
  sizes = {"time_scale.0": (time_dim, 160), "time_scale.2": (160, 1),
           "proto_inf1": (feature_dim, h1), "proto_inf2": (h1, h2), "proto_inf3": (h2, h2),
           "proto_inf4": (h2, h1), "proto_inf5": (h1, feature_dim)}
  sizes |= {f"time_emb{b}": (time_dim, sizes[f"proto_inf{b}"][1]) for b in range(1, 6)}
  out = {}
  for name, (fan_in, fan_out) in sizes.items():
    out[f"model.{name}.weight"] = rng.standard_normal((fan_out, fan_in)).astype(np.float32)
    out[f"model.{name}.bias"] = np.zeros(fan_out, np.float32)
  return out


def tree_files(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


@pytest.fixture(scope="module")
def imported(resnet_state_dict, head_sd, tmp_path_factory):
  """A workdir imported from the original's one file (flattened .npz, DataParallel names),
  1-shot, with the default config (miniImageNet, not built: its standard spec sizes it)."""
  folder = tmp_path_factory.mktemp("imported")
  path = save_npz(folder / "metadiff_1shot.npz", flatten(original_layout(resnet_state_dict, head_sd)))
  workdir = str(folder / "workdir")
  summary = import_torch.import_checkpoint(workdir, checkpoint=path, arch="metadiff", shots=1)
  return workdir, path, summary


def copy_of(imported, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(imported[0], workdir)
  return workdir


# ----------------------------------------------------------------------------- round trips

def test_the_original_file_round_trips_the_reference_parameters(
    imported, resnet_state_dict, head_sd, resnet_ref, ref):
  workdir, path, summary = imported
  tree, meta = restored(os.path.join(workdir, "pretrain", "best"))
  expected = pytorch_weights.resnet12_variables_from_torch(resnet_state_dict)
  assert_same_tree(tree["params"]["backbone"], expected["params"])
  assert_same_tree(tree["batch_stats"]["backbone"], expected["batch_stats"])
  assert meta["imported_from"] == path and meta["done"] and meta["image_shape"] == [84, 84, 3]
  assert_close_to_scale(imported_features(workdir, resnet_ref["input_nchw"]),
                        resnet_ref["features"], 1e-4)

  tree, meta = restored(os.path.join(workdir, "train_1shot", "best"))
  params = expected_head(head_sd)  # model.*, not the EMA copy
  assert_same_tree(tree["params"], params)
  assert_same_tree(tree["ema_params"], params)
  assert meta == {"imported_from": path, "use_ema": False}
  config = config_lib.load_workdir_config(workdir)
  model = tcunet.TCUNet(**pytorch_weights.tcunet_config_from_params(tree["ema_params"]))
  eps = model.apply({"params": tree["ema_params"]}, episode(ref, 1, "eps_w")[2],
                    episode(ref, 1, "eps_t")[2], episode(ref, 1, "support")[2],
                    episode(ref, 1, "support_labels")[2])
  assert_close_to_scale(eps, ref["k1/eps_out"][2], 1e-4)

  assert (config.backbone.name, config.backbone.activate_last, config.backbone.checkpoint) == (
      "resnet12", False, None)
  assert config_lib.variant_of(config) == "faithful"
  assert (config.denoiser.hidden_dims, config.denoiser.time_embed_dim) == ((256, 128), 320)
  assert config.train.shots == config.eval.shots == (1,)
  assert config.data.name == "mini_imagenet"  # not built here: its standard spec sized it
  assert config.stages == ("eval",)
  assert config.data.augment.mean is None  # MetaDiff's normalisation is the dataset's own
  assert summary["shots"] == [1] and len(summary["written"]) == 3 and not summary["reused"]
  assert summary["commands"]["eval"].startswith(
      f"python -m metadiff_jax.main --config=configs/from_workdir.py:{workdir} ")


def test_separate_files_without_the_module_prefix(resnet_state_dict, head_sd, resnet_ref, tmp_path):
  backbone = save_npz(tmp_path / "backbone.npz", resnet_state_dict)
  head = save_npz(tmp_path / "head.npz", head_sd)
  workdir = str(tmp_path / "workdir")
  import_torch.import_checkpoint(workdir, head=head, backbone=backbone, arch="metadiff",
                                 shots=5)
  tree, meta = restored(os.path.join(workdir, "pretrain", "best"))
  assert_same_tree(tree["params"]["backbone"],
                   pytorch_weights.resnet12_variables_from_torch(resnet_state_dict)["params"])
  assert meta["imported_from"] == backbone
  assert_close_to_scale(imported_features(workdir, resnet_ref["input_nchw"]),
                        resnet_ref["features"], 1e-4)
  tree, meta = restored(os.path.join(workdir, "train_5shot", "best"))
  assert_same_tree(tree["ema_params"], expected_head(head_sd))
  assert meta["imported_from"] == head
  assert config_lib.load_workdir_config(workdir).eval.shots == (5,)


def test_a_head_alone_with_its_ema_copy_into_the_workdir_of_its_backbone(imported, head_sd,
                                                                        tmp_path):
  workdir = copy_of(imported, tmp_path)
  head = save_npz(tmp_path / "head.npz", {f"module.{k}": v for k, v in head_sd.items()})
  summary = import_torch.import_checkpoint(workdir, head=head, shots=5, use_ema=True)
  tree, meta = restored(os.path.join(workdir, "train_5shot", "best"))
  assert_same_tree(tree["params"], expected_head(head_sd, ema=True))
  assert_same_tree(tree["ema_params"], expected_head(head_sd, ema=True))
  assert meta["use_ema"] is True
  # The 1-shot head stays, and the config now covers both shot settings.
  assert_same_tree(restored(os.path.join(workdir, "train_1shot", "best"))[0]["ema_params"],
                   expected_head(head_sd))
  assert config_lib.load_workdir_config(workdir).eval.shots == (1, 5)
  assert summary["shots"] == [1, 5] and summary["backbone"] is None


def test_predict_runs_on_an_imported_workdir_without_the_dataset(imported):
  from metadiff_jax import predict  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  support = {name: [rng.integers(0, 256, (84, 84, 3), np.uint8)] for name in "abc"}
  query = rng.integers(0, 256, (4, 84, 84, 3), np.uint8)
  result = predict.predict(imported[0], support, query)
  assert result.shots == 1 and result.probabilities.shape == (4, 3)
  np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_pth_file_of_the_original_keeps_the_same_backbone(imported, resnet_state_dict, head_sd,
                                                          tmp_path):
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  layout = original_layout(resnet_state_dict, head_sd)
  checkpoint_ = {part: {k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}
                 for part, tensors in layout.items()}
  checkpoint_["embedding"]["module.layer1.bn1.num_batches_tracked"] = torch.tensor(7)
  path = tmp_path / "metadiff_5shot.pth"
  torch.save(checkpoint_, path)
  workdir = copy_of(imported, tmp_path)
  before = tree_files(os.path.join(workdir, "pretrain"))
  summary = import_torch.import_checkpoint(workdir, checkpoint=str(path), arch="metadiff",
                                           shots=5)
  assert summary["reused"] == [os.path.join(workdir, "pretrain", "best")]
  assert tree_files(os.path.join(workdir, "pretrain")) == before
  tree, _ = restored(os.path.join(workdir, "train_5shot", "best"))
  assert_same_tree(tree["ema_params"], expected_head(head_sd))


@pytest.mark.parametrize("arch", ["meta_baseline", "metaoptnet", "feat"])
def test_other_published_resnet12_layouts(arch, resnet_state_dict, resnet_ref, tmp_path):
  """Each layout as its own code saves it (docs/IMPORTING.md), flattened into an .npz."""
  if arch == "meta_baseline":  # {'model_sd': classifier}: encoder.*, classifier.linear.*
    tensors = {f"encoder.{k}": v for k, v in resnet_state_dict.items()}
    tensors |= {"classifier.linear.weight": np.zeros((64, 512), np.float32),
                "classifier.linear.bias": np.zeros(64, np.float32)}
  else:  # each layer an nn.Sequential of one block: layerL.0.*
    indexed = {k.replace(".", ".0.", 1): v for k, v in resnet_state_dict.items()}
    if arch == "metaoptnet":  # {'embedding': DataParallel, 'head': ...}
      tensors = {f"embedding.module.{k}": v for k, v in indexed.items()}
      tensors |= {"head.scale": np.ones(1, np.float32)}
    else:  # FEAT: {'params': model}: encoder.*, slf_attn.*
      tensors = {f"encoder.{k}": v for k, v in indexed.items()}
      tensors |= {"slf_attn.w_qs.weight": np.zeros((640, 640), np.float32)}
  path = save_npz(tmp_path / f"{arch}.npz", tensors)
  workdir = str(tmp_path / "workdir")
  summary = import_torch.import_checkpoint(workdir, backbone=path, arch=arch)
  config = config_lib.load_workdir_config(workdir)
  assert config.backbone.activate_last  # all three activate after the fourth block's sum
  assert summary["head"] is None and not os.path.exists(os.path.join(workdir, "train_1shot"))
  assert config.stages == ("prototypes", "train", "eval")
  # The reference map, activated: max-pooling commutes with the monotone LeakyReLU.
  feature_map = resnet_ref["feature_map_nchw"]
  expected = np.where(feature_map > 0, feature_map, 0.1 * feature_map).mean(axis=(2, 3))
  assert_close_to_scale(imported_features(workdir, resnet_ref["input_nchw"]), expected, 1e-4)
  mean = config.data.augment.mean
  if arch == "meta_baseline":  # ImageNet statistics, not miniImageNet's own
    assert mean == (0.485, 0.456, 0.406) and config.data.augment.std == (0.229, 0.224, 0.225)
    assert summary["normalization"]["set"] and "80x80" in summary["notes"][0]
  else:
    assert mean is None
    assert augment.from_config(config.data).mean == augment.NORMALIZATION["mini_imagenet"][0]


def test_the_nested_files_each_project_saves(resnet_state_dict):
  """The dicts `torch.load` returns for each project's file (docs/IMPORTING.md), tensors as
  numpy arrays: the backbone's names come out bare, whatever else the file holds."""
  indexed = {k.replace(".", ".0.", 1): v for k, v in resnet_state_dict.items()}
  files = {
      "meta_baseline": {  # train_classifier.py's save_obj
          "file": "train_classifier.py", "config": {"model": "classifier"},
          "model": "classifier", "model_args": {"encoder": "resnet12"},
          "model_sd": {**{f"encoder.{k}": v for k, v in resnet_state_dict.items()},
                       "classifier.linear.weight": np.zeros((64, 512))},
          "training": {"epoch": 100, "optimizer_sd": {"state": {}, "param_groups": []}}},
      "metaoptnet": {"embedding": {f"module.{k}": v for k, v in indexed.items()},
                     "head": {"scale": np.ones(1)}},
      "feat": {"params": {**{f"encoder.module.{k}": v for k, v in indexed.items()},
                          "slf_attn.w_qs.weight": np.zeros((640, 640))}},
  }
  for arch, contents in files.items():
    state_dict = pytorch_weights.backbone_state_dict(contents, f"{arch}.pth")
    assert pytorch_weights.has_block_index(state_dict) == import_torch.ARCHS[arch].block_index
    assert_same_tree(pytorch_weights.resnet12_variables_from_torch(state_dict),
                     pytorch_weights.resnet12_variables_from_torch(resnet_state_dict))


def test_the_head_in_each_file_layout(head_sd):
  nested = {"embedding": {}, "head": head_sd}
  for contents in (nested, flatten(nested), head_sd, {"state_dict": nested}):
    assert pytorch_weights.head_state_dict(contents, "x.pth").keys() == head_sd.keys()
  with pytest.raises(ValueError, match="no tensors where the head's state dict"):
    pytorch_weights.head_state_dict({"epoch": 3}, "x.pth")


# ----------------------------------------------------------------------------- eval and CLI

@pytest.fixture(scope="module")
def textures_dir(tmp_path_factory):
  """A tiny RGB texture set (30 classes: 19/5/6, 6 images of 16 x 16 each)."""
  return build_tiny(tmp_path_factory.mktemp("textures"), "textures", num_classes=30,
                    images_per_class=6, image_size=16)


def run_import(*args):
  return subprocess.run([sys.executable, "-m", "metadiff_jax.import_torch", *args], cwd=REPO,
                        env=cpu_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # builds a dataset, then the pipeline command embeds it and evaluates
def test_the_eval_stage_runs_on_an_imported_workdir(resnet_state_dict, head_sd, textures_dir,
                                                    tmp_path):
  path = save_npz(tmp_path / "metadiff.npz", flatten(original_layout(resnet_state_dict, head_sd)))
  config_file = tmp_path / "textures_tiny.py"
  config_file.write_text(
      "from metadiff_jax import config_lib\n\n\ndef get_config(arg=None):\n"
      f"  config = config_lib.load_config_file({str(REPO / 'configs' / 'textures_conv4.py')!r})\n"
      f"  config.data.data_dir = {textures_dir!r}\n"
      "  config.data.builder_config = 'tiny'\n  return config\n")
  workdir = str(tmp_path / "workdir")
  proc = run_import("--checkpoint", path, "--backbone_arch", "metadiff", "--shots", "1",
                    "--workdir", workdir, "--config", str(config_file))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "input 16x16x3" in proc.stdout and f"wrote {workdir}/train_1shot/best" in proc.stdout
  assert import_torch.commands(workdir)["eval"] in proc.stdout
  # The head was trained with T = 1000; the sampler is respaced to 10 of those steps.
  proc = run_main(f"--config=configs/from_workdir.py:{workdir}", f"--workdir={workdir}",
                  "--config.stages=('eval',)", "--config.eval.episodes=8",
                  "--config.eval.batch_episodes=8", "--config.eval.queries=5",
                  "--config.eval.diagnostic_episodes=0",
                  "--config.diffusion.num_sampling_steps=10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    result = json.load(f)["results"]["1shot"]
  assert result["metadiff"]["n"] == 8 and 0.0 <= result["metadiff"]["mean"] <= 1.0
  assert result["settings"]["sampler"]["num_sampling_steps"] == 10


def test_the_pretrain_stage_imports_the_backbone_its_config_names(resnet_state_dict,
                                                                   textures_dir, tmp_path):
  # config.backbone.checkpoint: the pipeline's own import, which writes the same pretrain/best
  # as `import_torch` does and records the input shape that `predict` reads.
  from metadiff_jax import stages  # pylint: disable=g-import-not-at-top
  from metadiff_jax import pretraining  # pylint: disable=g-import-not-at-top
  path = save_npz(tmp_path / "backbone.npz",
                  {f"module.{k}": v for k, v in resnet_state_dict.items()})
  config = config_lib.load_config_file(str(REPO / "configs" / "textures_conv4.py"))
  config.data.data_dir = textures_dir
  config.data.builder_config = "tiny"
  config.backbone.name = "resnet12"
  config.backbone.checkpoint = path
  config.stages = ("pretrain",)
  workdir = str(tmp_path / "run")
  stages.run(config, workdir)
  tree, meta = restored(os.path.join(workdir, "pretrain", "best"))
  assert meta["imported_from"] == path and meta["image_shape"] == [16, 16, 3]
  assert_same_tree(pretraining.backbone_variables(tree),
                   pytorch_weights.resnet12_variables_from_torch(resnet_state_dict))


@pytest.mark.parametrize("args, message", [
    ([], "error: nothing to import"),
    (["--backbone", "b.npz", "--backbone_arch", "resnet"], "error: unknown --backbone_arch"),
    (["--shots", "one"], "error: argument --shots: invalid int value"),
])
def test_command_line_errors_are_one_line(args, message, tmp_path):
  workdir = tmp_path / "workdir"
  proc = run_import("--workdir", str(workdir), *args)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith(message), proc.stderr
  assert not workdir.exists()


# ----------------------------------------------------------------------------- errors

def test_errors_of_the_flags(resnet_state_dict, head_sd, tmp_path, monkeypatch):
  single = save_npz(tmp_path / "single.npz", flatten(original_layout(resnet_state_dict, head_sd)))
  backbone = save_npz(tmp_path / "backbone.npz", resnet_state_dict)
  workdir = str(tmp_path / "workdir")
  cases = [
      (dict(), "nothing to import"),
      (dict(checkpoint=single, head=single, arch="metadiff", shots=1), "not both"),
      (dict(checkpoint=single, backbone=backbone, arch="metadiff", shots=1), "not both"),
      (dict(backbone=backbone, arch="resnet12"), "unknown --backbone_arch 'resnet12'"),
      (dict(backbone=backbone), "--backbone_arch is required"),
      (dict(checkpoint=single, arch="metadiff"), "--shots K is required"),
      (dict(checkpoint=str(tmp_path / "absent.pth"), arch="metadiff", shots=1),
       "no file .*absent.pth"),
      (dict(head=single, shots=1), "holds none"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ImportCheckpointError, match=message) as info:
      import_torch.import_checkpoint(workdir, **kwargs)
    assert "\n" not in str(info.value)
  broken = tmp_path / "broken.npz"
  broken.write_bytes(b"not a zip archive")
  with pytest.raises(ImportCheckpointError, match="cannot read .*broken.npz as an .npz"):
    import_torch.import_checkpoint(workdir, backbone=str(broken), arch="metadiff")
  no_ema = save_npz(tmp_path / "no_ema.npz", {k: v for k, v in head_sd.items()
                                             if not k.startswith("ema_model.")})
  with pytest.raises(ImportCheckpointError, match="the head has none; drop --use_ema"):
    import_torch.import_checkpoint(workdir, head=no_ema, backbone=backbone, arch="metadiff",
                                   shots=1, use_ema=True)
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  pth = tmp_path / "metadiff.pth"
  pth.write_bytes(b"")
  with pytest.raises(ImportCheckpointError, match=r"needs PyTorch.*metadiff_jax\[torch\]"):
    import_torch.import_checkpoint(workdir, checkpoint=str(pth), arch="metadiff", shots=1)
  assert not os.path.exists(workdir)


def test_errors_of_the_checkpoints(resnet_state_dict, head_sd, tmp_path):
  workdir = str(tmp_path / "workdir")
  other = {k: np.zeros(recipe_shape(k, widths=(64, 96, 128, 256)), np.float32)
           for k in resnet_state_dict}
  path = save_npz(tmp_path / "other.npz", other)
  with pytest.raises(ImportCheckpointError, match=r"widths 64-96-128-256, which no configured"):
    import_torch.import_checkpoint(workdir, backbone=path, arch="metadiff")
  path = save_npz(tmp_path / "plain.npz", resnet_state_dict)
  with pytest.raises(ImportCheckpointError, match=r"layerL\.\*, the layout of metadiff or "
                     r"meta_baseline, not of --backbone_arch feat"):
    import_torch.import_checkpoint(workdir, backbone=path, arch="feat")
  # A head of 640-d features with the 512-d backbone, in one file.
  mixed = original_layout(resnet_state_dict, fake_head(640))
  path = save_npz(tmp_path / "mixed.npz", flatten(mixed))
  with pytest.raises(ImportCheckpointError) as info:
    import_torch.import_checkpoint(workdir, checkpoint=path, arch="metadiff", shots=1)
  assert str(info.value).startswith(
      f"the head in {path} does not fit the backbone's 512-d features ({path}): its "
      "`proto_inf1.weight` has shape (256, 640) where (256, 512) is needed")
  assert not os.path.exists(workdir)


def test_a_workdir_is_never_overwritten(imported, resnet_state_dict, head_sd, tmp_path):
  workdir = copy_of(imported, tmp_path)
  before = tree_files(workdir)
  other_backbone = {k: v * 2 for k, v in resnet_state_dict.items()}
  path = save_npz(tmp_path / "other.npz", flatten(original_layout(other_backbone, head_sd)))
  with pytest.raises(ImportCheckpointError, match="already holds another backbone .*choose an "
                     "empty --workdir"):
    import_torch.import_checkpoint(workdir, checkpoint=path, arch="metadiff", shots=5)
  same = save_npz(tmp_path / "same.npz", flatten(original_layout(resnet_state_dict, head_sd)))
  with pytest.raises(ImportCheckpointError, match=r"holds a backbone \(pretrain/best\) and "
                     r"denoisers \(train_1shot\) written with another config .*"
                     r"\(config.backbone, config.data\)"):
    import_torch.import_checkpoint(workdir, checkpoint=same, arch="meta_baseline", shots=5)
  other_head = {k: v * 2 if k.startswith(("model.", "ema_model.")) else v
                for k, v in head_sd.items()}
  path = save_npz(tmp_path / "head.npz", other_head)
  with pytest.raises(ImportCheckpointError, match="already holds another 1-shot head"):
    import_torch.import_checkpoint(workdir, head=path, shots=1)
  path = save_npz(tmp_path / "wide_head.npz", fake_head(640))
  with pytest.raises(ImportCheckpointError, match=r"`proto_inf1.weight` has shape \(256, 640\) "
                     r"where \(256, 512\) is needed"):
    import_torch.import_checkpoint(workdir, head=path, shots=5)
  assert tree_files(workdir) == before
