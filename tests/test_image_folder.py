"""A user's own image folder: normalisation from its build, rebuilds on change, the CPU config.

The folder is the session's tiny glyph build exported as PNGs (`python -m metadiff_jax.data
export`), so the pipeline runs on characters rather than noise.
"""

import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from metadiff_jax import config_lib, errors
from metadiff_jax.data import __main__ as data_cli
from metadiff_jax.data import augment, builders, load
from metadiff_jax.data.errors import DataError
from metadiff_jax.data.spec import SPLITS
from tiny_pipeline import load_config, tiny_config


def _build(data_dir, root, name, size=(16, 16), channels=1, report=None):
  config = builders.ImageFolderConfig(name=name, image_size=size, channels=channels)
  builders.build(builders.make_builder("image_folder", str(data_dir), str(root), config=config),
                 report=report)
  return load.DatasetRef("image_folder", str(data_dir), name)


def _data_config(ref, **augment_fields):
  config = load_config("image_folder_conv4")
  config.data.data_dir = ref.data_dir
  config.data.builder_config = ref.config
  config.data.augment.update(augment_fields)
  return config


@pytest.fixture(scope="module")
def glyph_folder(data_dir, tmp_path_factory):
  """The tiny glyph build exported as root/{train,val,test}/<class>/*.png (16 x 16 gray)."""
  root = tmp_path_factory.mktemp("glyph_folder") / "root"
  assert data_cli.main(["export", "glyphs", "--data_dir", data_dir, "--config", "tiny",
                        "--out", str(root)]) == 0
  return root


@pytest.fixture(scope="module")
def gray_build(glyph_folder, tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tfds"), glyph_folder, "gray")


def test_export_writes_the_layout_the_image_folder_reads(data_dir, glyph_folder, gray_build):
  glyphs = load.DatasetRef("glyphs", data_dir, "tiny")
  for split in SPLITS:
    want, got = (load.load_split(r, split, progress=False) for r in (glyphs, gray_build))
    np.testing.assert_array_equal(got.images, want.images)  # PNG is lossless, no resize
    np.testing.assert_array_equal(got.labels, want.labels)
    assert len(got.class_names) == len(want.class_names)


@pytest.mark.parametrize("channels", [1, 3])
def test_the_build_stores_its_train_statistics(glyph_folder, tmp_path, channels):
  ref = _build(tmp_path, glyph_folder, f"c{channels}", channels=channels)
  train = load.load_split(ref, "train", progress=False).images / 255.0
  mean, std = load.normalization(ref)
  assert len(mean) == len(std) == channels
  np.testing.assert_allclose(mean, train.mean(axis=(0, 1, 2)), rtol=0, atol=1e-9)
  np.testing.assert_allclose(std, train.std(axis=(0, 1, 2)), rtol=0, atol=1e-9)
  # Not the val or test split's: those images differ.
  val = load.load_split(ref, "val", progress=False).images / 255.0
  assert abs(mean[0] - val.mean()) > 1e-6
  # The config takes them by default; explicit values still override.
  aug = augment.from_config(_data_config(ref).data)
  assert aug.mean == mean and aug.std == std
  override = augment.from_config(_data_config(ref, mean=(0.5,), std=(0.25,)).data)
  assert override.mean == (0.5,) and override.std == (0.25,)


def test_the_gpu_config_feeds_one_channel_to_its_resnet12(gray_build):
  # configs/image_folder.py on a grayscale build: ImageNet's three means broadcast one channel
  # to three before, and pretraining stopped in Flax with a ScopeParamShapeError.
  import jax  # pylint: disable=g-import-not-at-top
  from metadiff_jax import embedding  # pylint: disable=g-import-not-at-top
  config = load_config("image_folder")
  config.data.data_dir, config.data.builder_config = gray_build.data_dir, gray_build.config
  images = load.load_split(gray_build, "train", progress=False).images[:2]
  x = augment.preprocess(images, embedding.augment_config(config))
  assert x.shape == images.shape == (2, 16, 16, 1)
  module = embedding.backbone(config)
  variables = module.init(jax.random.key(0), x, train=False)
  features = module.apply(variables, x, train=False)
  assert features.shape[0] == 2 and np.isfinite(np.asarray(features)).all()


def test_named_datasets_keep_their_constants():
  # The demo's table depends on these: a build's own statistics never replace them.
  for name, (mean, std) in [("glyphs", ((0.1667,), (0.3440,))),
                            ("textures", ((0.3736, 0.3594, 0.3681),
                                          (0.2549, 0.2479, 0.2515)))]:
    aug = augment.from_config(config_lib.base_config(name, "conv4").data)
    assert (aug.mean, aug.std) == (mean, std)


def test_a_statistics_count_that_does_not_fit_the_channels_is_one_line(gray_build):
  # The 3-channel ImageNet numbers on a grayscale build crashed inside Flax before.
  config = _data_config(gray_build, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  with pytest.raises(errors.ConfigError, match=r"augment.mean has 3 values but the "
                     r"image_folder build 'gray' has 1-channel images"):
    augment.from_config(config.data)
  with pytest.raises(errors.ConfigError, match="augment.std must hold finite numbers > 0"):
    augment.from_config(_data_config(gray_build, std=(0.0,)).data)
  with pytest.raises(errors.ConfigError, match="augment.mean has 2 values but glyphs"):
    config = config_lib.base_config("glyphs", "conv4")
    config.data.augment.mean = (0.1, 0.2)
    augment.from_config(config.data)


def test_a_build_without_statistics_says_how_to_fix_it(glyph_folder, tmp_path):
  ref = _build(tmp_path, glyph_folder, "old")
  path = pathlib.Path(load.dataset_dir(ref)) / "metadata.json"
  metadata = json.loads(path.read_text())
  del metadata["normalization"], metadata["source"]  # as written before either was stored
  path.write_text(json.dumps(metadata))
  with pytest.raises(DataError, match="no stored normalisation statistics.*build it again"):
    augment.from_config(_data_config(ref).data)
  with pytest.raises(DataError, match="is not built"):
    augment.from_config(_data_config(load.DatasetRef("image_folder", str(tmp_path),
                                                     "none")).data)
  # Building again fingerprints it and stores the statistics.
  lines = []
  _build(tmp_path, glyph_folder, "old", report=lines.append)
  assert "before its source files were fingerprinted" in lines[-1]
  assert len(load.normalization(ref)[0]) == 1


def _counts(ref):
  return {s: (len(load.class_names(ref, s)), len(load.open_source(ref, s))) for s in SPLITS}


def test_a_changed_folder_is_rebuilt_and_a_failed_rebuild_keeps_the_old_one(tmp_path):
  fx.write_image_folder(tmp_path / "root", 3, images_per_class=4, seed=1)
  lines = []
  build = lambda size=(8, 8): _build(tmp_path / "tfds", tmp_path / "root", "mine", size=size,
                                     report=lines.append)
  ref = build()
  assert _counts(ref)["train"] == (3, 12)
  build()
  assert lines[-1].startswith("kept") and "unchanged" in lines[-1]

  train = tmp_path / "root/train"
  first = sorted(train.iterdir())[0]
  (first / "extra.png").write_bytes((first / "img_000.png").read_bytes())  # one more image
  build()
  assert lines[-1].startswith("rebuilding") and "train 3 classes / 12 images -> 3 / 13" in (
      lines[-1])
  assert _counts(ref)["train"] == (3, 13)

  new_class = train / "train_new"  # a new class, and one image fewer elsewhere
  new_class.mkdir()
  (first / "extra.png").rename(new_class / "a.png")
  (first / "img_001.PNG").rename(new_class / "b.png")
  build()
  assert _counts(ref)["train"] == (4, 13)
  assert "train_new" in load.class_names(ref, "train")

  # Same names and sizes, other pixels: the modification time tells.
  before = load.fingerprint(ref)
  target = first / "img_002.png"
  pixels = np.random.default_rng(9).integers(0, 256, (8, 8), np.uint8)
  stat = target.stat()
  Image.fromarray(pixels).save(target)
  os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  build()
  assert lines[-1].endswith("file names, sizes or modification times changed")
  assert load.fingerprint(ref) != before
  train_data = load.load_split(ref, "train", progress=False)
  index = np.flatnonzero(train_data.labels == train_data.class_names.index(first.name))[1]
  np.testing.assert_array_equal(train_data.images[index, ..., 0], pixels)  # img_002.png

  # Another size under the same name is rebuilt too, not kept at the old size.
  build(size=(6, 6))
  assert "image size 8x8 -> 6x6" in lines[-1]
  assert load.image_shape(ref) == (6, 6, 1)

  # A corrupt new image: the rebuild fails, the build before it stays, nothing is left over.
  kept = load.fingerprint(ref)
  (first / "img_003.png").write_bytes(b"\x89PNG broken")
  with pytest.raises(DataError, match="img_003.png"):
    build(size=(6, 6))
  assert load.fingerprint(ref) == kept and load.image_shape(ref) == (6, 6, 1)
  assert sorted(os.listdir(tmp_path / "tfds/image_folder/mine")) == ["1.0.0"]


def test_the_command_line_says_whether_it_built_kept_or_rebuilt(tmp_path, capsys):
  fx.write_image_folder(tmp_path / "root", 3, images_per_class=4, seed=2)
  args = ["build", "image_folder", "--data_dir", str(tmp_path / "tfds"), "--manual_dir",
          str(tmp_path / "root"), "--config", "cli", "--image_size", "8", "--channels", "1"]
  assert data_cli.main(args) == 0
  out = capsys.readouterr().out
  assert "built image_folder in" in out and "train pixel mean (" in out
  assert data_cli.main(args) == 0
  assert "image_folder already built" in capsys.readouterr().out
  (tmp_path / "root/val/val_x/img_000.png").unlink()
  assert data_cli.main(args) == 0
  out = capsys.readouterr().out
  assert "rebuilding" in out and "val 3 classes / 12 images -> 3 / 11" in out
  assert "val  : 3 classes, 11 images" in out
  # Exporting over a folder that holds files is refused in one line.
  assert data_cli.main(["export", "image_folder", "--data_dir", str(tmp_path / "tfds"),
                        "--config", "cli", "--out", str(tmp_path / "root")]) == 2
  assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cpu_config_runs_end_to_end_on_a_grayscale_folder(gray_build, glyph_folder,
                                                              tmp_path):
  # Item 3's crash was in pretraining a 1-channel folder; the whole tiny pipeline runs here.
  from metadiff_jax import stages  # pylint: disable=g-import-not-at-top
  from metadiff_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config(gray_build.data_dir, "image_folder_conv4", gray_build.config,
                       train__steps=10, train__val_every_steps=10,
                       eval__episodes=10, eval__batch_episodes=5, eval__diagnostic_episodes=0)
  config_lib.check(config)
  stages.run(config, str(tmp_path))
  _, variables = workdir_lib.pretrained_backbone(config, str(tmp_path))
  kernels = [v for k, v in _flat(variables["params"]).items() if k.endswith("kernel")]
  assert min(k.shape[-2] for k in kernels if k.ndim == 4) == 1  # the first conv: 1 channel
  result = json.loads((tmp_path / "results.json").read_text())["results"]["1shot"]
  for method in ("metadiff", "prototypes"):
    assert result[method]["n"] == 10 and 0 <= result[method]["mean"] <= 1
  assert np.isfinite(result["metadiff"]["norm_ratio"])
  # The record holds the statistics the backbone was trained with, so predict runs where the
  # build is gone (a laptop with only the workdir).
  recorded = json.loads((tmp_path / "config.json").read_text())["data"]["augment"]
  mean, std = load.normalization(gray_build)
  assert recorded["mean"] == pytest.approx(list(mean)) and recorded["std"] == pytest.approx(
      list(std))
  from metadiff_jax import predict  # pylint: disable=g-import-not-at-top
  test = sorted((glyph_folder / "test").iterdir())[:3]
  support = {c.name: sorted(c.glob("*.png"))[:1] for c in test}
  queries = [sorted(c.glob("*.png"))[1] for c in test]
  moved = gray_build.data_dir + ".moved"
  os.rename(gray_build.data_dir, moved)
  try:
    result = predict.predict(str(tmp_path), support, queries, method="prototypes")
  finally:
    os.rename(moved, gray_build.data_dir)
  assert len(result.predicted) == 3


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out
