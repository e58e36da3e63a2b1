"""Every on-disk format -> TFDS build -> data_source -> episodes, on tiny fixtures.

The fixtures (tests/data_fixtures.py) are written in each real format; the builders write
array_record files; `load` reads them back with `tfds.data_source` machinery and no TensorFlow.
Counts, labels, class names and pixels must round-trip.
"""

import functools
import hashlib
import json
import os
import time
import subprocess
import sys

import numpy as np
import pytest

import data_fixtures as fx
from conftest import REPO
from metadiff_jax.data import builders, episodes, load
from metadiff_jax.data.errors import DataError
from metadiff_jax.data.spec import SPLITS, standard_spec

SMALL = {"train": 3, "val": 2, "test": 2}


def _check_round_trip(ref, expected, atol=0):
  for split in SPLITS:
    data = load.load_split(ref, split, progress=False)
    want = expected[split]
    assert data.class_names == tuple(want.class_names), split
    np.testing.assert_array_equal(data.labels, np.asarray(want.labels))
    np.testing.assert_array_equal(load.split_labels(ref, split), data.labels)
    images = np.stack([np.asarray(im) for im in want.images])
    assert data.images.shape == images.shape and data.images.dtype == np.uint8
    if atol:
      assert np.abs(data.images.astype(int) - images.astype(int)).max() <= atol
    else:
      np.testing.assert_array_equal(data.images, images)
    assert _content_sha256(data) == _metadata(ref)["content_sha256"][split]
    source = load.open_source(ref, split)
    assert len(source) == len(images)
    np.testing.assert_array_equal(source[len(source) - 1]["image"], data.images[-1])
    # Episodes drawn from the built split point at images of the classes they name.
    sampler = episodes.EpisodeSampler(data.labels, 2, 1, 1, seed=0, split=split)
    ep = sampler.batch(0, 4)
    np.testing.assert_array_equal(data.labels[ep.support], np.take_along_axis(
        ep.classes, ep.support_labels, axis=1))


def _metadata(ref):
  with open(os.path.join(load.dataset_dir(ref), "metadata.json")) as f:
    return json.load(f)


def _content_sha256(data):
  h = hashlib.sha256(repr((data.images.shape[1:], len(data.labels))).encode())
  for image, label in zip(data.images, data.labels.astype(np.int64)):
    h.update(image.tobytes())
    h.update(label.tobytes())
  return h.hexdigest()


def _build(name, tmp_path, manual, **kwargs):
  builder = builders.make_builder(name, str(tmp_path / "tfds"), str(manual), **kwargs)
  path = builders.build(builder)
  assert os.path.isdir(path)
  return load.DatasetRef(name, str(tmp_path / "tfds"), kwargs.get("config") and
                         getattr(kwargs["config"], "name", kwargs["config"]))


IMAGENET_LAYOUTS = {  # layout -> (dataset, fixture writer, seed, pixel tolerance)
    "gidaris": ("mini_imagenet", fx.write_mini_imagenet_gidaris, 0, 0),
    "gidaris_py3_no_names": ("mini_imagenet", functools.partial(
        fx.write_mini_imagenet_gidaris, py2=False, catname2label=False), 0, 0),
    "cache": ("mini_imagenet", fx.write_mini_imagenet_cache, 0, 0),
    "jpeg": ("mini_imagenet", fx.write_mini_imagenet_jpeg, 0, 8),
    "ren": ("tiered_imagenet", fx.write_tiered_ren, 1, 0),
    "metaoptnet": ("tiered_imagenet", fx.write_tiered_metaoptnet, 1, 0),
}


@pytest.mark.parametrize("layout", sorted(IMAGENET_LAYOUTS))
def test_mini_and_tiered_imagenet_every_format(tmp_path, layout):
  name, write, seed, atol = IMAGENET_LAYOUTS[layout]
  spec = standard_spec(name).subset(SMALL, images_per_class=3)
  manual = tmp_path / "manual"
  manual.mkdir()
  expected = write(manual, spec, seed=seed)
  ref = _build(name, tmp_path, manual, spec=spec)
  _check_round_trip(ref, expected, atol=atol)


@pytest.mark.parametrize("name", ["cifar_fs", "fc100"])
def test_cifar_from_the_archive_and_from_pickles(tmp_path, name):
  (tmp_path / "archive").mkdir()
  archive = fx.write_cifar100_archive(tmp_path / "archive", seed=2, images_per_class_train=2,
                                      images_per_class_test=1)
  spec = standard_spec(name).subset(images_per_class=3)  # all classes, 2 + 1 images each
  ref = _build(name, tmp_path / "a", archive.path.parent, spec=spec, archive_md5=archive.md5)
  _check_round_trip(ref, archive.expected(spec))
  assert [len(load.class_names(ref, s)) for s in SPLITS] == [
      spec.num_classes(s) for s in SPLITS]

  small = standard_spec(name).subset(SMALL, images_per_class=3)
  manual = tmp_path / "pickles"
  manual.mkdir()
  prefix = "CIFAR_FS" if name == "cifar_fs" else "FC100"
  expected = fx.write_cifar_metaoptnet(manual, prefix, small, seed=3)
  _check_round_trip(_build(name, tmp_path / "b", manual, spec=small), expected)


def test_cifar_archive_with_wrong_checksum_is_refused_and_nothing_is_written(tmp_path):
  (tmp_path / "archive").mkdir()
  archive = fx.write_cifar100_archive(tmp_path / "archive", seed=2)
  builder = builders.make_builder("cifar_fs", str(tmp_path / "tfds"), str(archive.path.parent),
                                  spec=standard_spec("cifar_fs").subset(images_per_class=3))
  with pytest.raises(DataError, match="eb9058c3a382ffc7106e4002c42a8d85"):
    builders.build(builder)  # the published md5 is checked by default
  with pytest.raises(DataError, match="not built"):
    load.dataset_dir(load.DatasetRef("cifar_fs", str(tmp_path / "tfds")))


def test_image_folder_with_its_own_name_and_size(tmp_path):
  expected = fx.write_image_folder(tmp_path / "root", {"train": 3, "val": 2, "test": 2},
                                   images_per_class=3, seed=4, size=(8, 8))
  config = builders.ImageFolderConfig(name="flowers", image_size=(8, 8), channels=3)
  ref = _build("image_folder", tmp_path, tmp_path / "root", config=config)
  assert ref.config == "flowers"
  _check_round_trip(ref, expected)
  info = json.loads((tmp_path / "tfds/image_folder/flowers/1.0.0/features.json").read_text())
  assert "Tensor" in json.dumps(info)  # uint8 Tensor features: no TensorFlow to encode


def test_a_failed_build_leaves_an_earlier_build_intact(tmp_path):
  expected = fx.write_image_folder(tmp_path / "root", 2, images_per_class=3, seed=5)
  config = builders.ImageFolderConfig(name="mine", image_size=(8, 8))
  ref = _build("image_folder", tmp_path, tmp_path / "root", config=config)
  before = load.fingerprint(ref)
  bad = tmp_path / "root/train" / sorted(os.listdir(tmp_path / "root/train"))[0] / "img_000.png"
  bad.write_bytes(b"\x89PNG broken")
  with pytest.raises(DataError, match="img_000.png"):
    builders.build(builders.make_builder(
        "image_folder", str(tmp_path / "tfds2"), str(tmp_path / "root"), config=config))
  assert load.fingerprint(ref) == before
  _check_round_trip(ref, expected)


def test_reading_errors_say_how_to_build(tmp_path):
  ref = load.DatasetRef("mini_imagenet", str(tmp_path))
  with pytest.raises(DataError, match="python -m metadiff_jax.data build mini_imagenet"):
    load.load_split(ref, "train")
  with pytest.raises(DataError, match="unknown dataset 'omniglot'"):
    builders.make_builder("omniglot", str(tmp_path))
  with pytest.raises(DataError, match="needs --manual_dir"):
    builders.build(builders.make_builder("mini_imagenet", str(tmp_path)))


@pytest.mark.slow  # several CLI processes, each importing the data stack
def test_cli_build_and_inspect_and_errors(tmp_path):
  fx.write_image_folder(tmp_path / "root", 3, images_per_class=4, seed=6, size=(8, 8))
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  run = lambda *a: subprocess.run([sys.executable, "-m", "metadiff_jax.data", *a],
                                  capture_output=True, text=True, env=env, timeout=300)
  out = run("build", "image_folder", "--data_dir", str(tmp_path / "tfds"), "--manual_dir",
            str(tmp_path / "root"), "--config", "toy", "--image_size", "8")
  assert out.returncode == 0, out.stderr
  assert "train: 3 classes, 12 images" in out.stdout
  png = tmp_path / "episode.png"
  out = run("inspect", "image_folder", "--data_dir", str(tmp_path / "tfds"), "--config", "toy",
            "--ways", "3", "--shots", "1", "--queries", "2", "--out", str(png))
  assert out.returncode == 0, out.stderr
  assert "test : 3 classes, 12 images" in out.stdout and png.stat().st_size > 1000
  # An impossible episode, a missing dataset, a missing manual dir: one line, exit status 2.
  for args, message in [
      (("inspect", "image_folder", "--data_dir", str(tmp_path / "tfds"), "--config", "toy",
        "--ways", "4"), "4-way episodes need 4 classes"),
      (("inspect", "glyphs", "--data_dir", str(tmp_path / "none")), "build glyphs"),
      (("build", "mini_imagenet", "--data_dir", str(tmp_path / "x"), "--manual_dir",
        str(tmp_path / "missing")), "does not exist")]:
    out = run(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# Makes TensorFlow absent even where it is installed: imports fail and probes find nothing.
NO_TENSORFLOW = """
import importlib.abc, importlib.util, sys
def _blocked(name):
  return name == "tensorflow" or name.startswith("tensorflow.")
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if _blocked(name):
      raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)", name=name)
sys.meta_path.insert(0, Block())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if _blocked(name) else _find_spec(name, *a)
"""


def test_the_data_stack_works_with_tensorflow_absent(tmp_path):
  # TensorFlow is blocked outright (not merely uninstalled): build, read, sample, embed.
  code = NO_TENSORFLOW + f"""
import numpy as np, jax.numpy as jnp
sys.path.insert(0, {str(REPO / "tests")!r})
import data_fixtures as fx
from metadiff_jax.data import builders, episodes, features, glyphs, load, augment
fx.write_image_folder({str(tmp_path / "root")!r}, 3, images_per_class=4, seed=0)
b = builders.make_builder("image_folder", {str(tmp_path / "tfds")!r}, {str(tmp_path / "root")!r},
                          config=builders.ImageFolderConfig(name="x", image_size=(8, 8)))
builders.build(b)
g = builders.make_builder("glyphs", {str(tmp_path / "tfds")!r}, config=builders.EmbeddedConfig(
    name="tiny", num_classes=12, images_per_class=3, image_size=16))
builders.build(g)
for ref in (load.DatasetRef("image_folder", {str(tmp_path / "tfds")!r}, "x"),
            load.DatasetRef("glyphs", {str(tmp_path / "tfds")!r}, "tiny")):
  data = load.load_split(ref, "train", progress=False)
  assert (load.split_labels(ref, "train") == data.labels).all()
  ep = episodes.EpisodeSampler(data.labels, 2, 1, 1, seed=0, split="train").batch(0, 2)
  fs = features.embed(lambda v, x: x.reshape(x.shape[0], -1).astype(jnp.float32), None,
                      data.images, batch_size=4, progress=False)
  features.gather(jnp.asarray(fs), ep.support, ep.query)
assert "tensorflow" not in sys.modules
print("ok")
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.slow  # the full default build: 640 classes
def test_the_default_glyph_build_from_the_command_line(tmp_path):
  # The README's command; its time is reported here, not asserted (the issue asks < 90 s).
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  dirs = [tmp_path / "a", tmp_path / "b"]
  for d in dirs:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "metadiff_jax.data", "build", "glyphs",
                          "--data_dir", str(d)], capture_output=True, text=True, env=env,
                         timeout=600)
    print(f"glyph build: {time.perf_counter() - start:.1f} s wall")
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("train: 410 classes, 8200 images", "val  : 102 classes, 2040 images",
                 "test : 128 classes, 2560 images"):
      assert line in out.stdout
  a, b = (load.DatasetRef("glyphs", str(d)) for d in dirs)
  assert _metadata(a)["content_sha256"] == _metadata(b)["content_sha256"]  # deterministic
  assert load.fingerprint(a) == load.fingerprint(b)
  test = load.load_split(a, "test", progress=False)
  assert test.images.shape == (2560, 32, 32, 1) and test.num_classes == 128
  assert _content_sha256(test) == _metadata(a)["content_sha256"]["test"]


def test_cifar_without_files_or_network_says_what_to_do(tmp_path, monkeypatch):
  # The bounded download itself is tested against closed and silent local ports in
  # test_data_formats.py; here no socket is opened at all.
  def offline(url, path, md5):
    raise builders.DownloadFailed(f"no route to {url}")

  monkeypatch.setattr(builders, "download_file", offline)
  builder = builders.make_builder("fc100", str(tmp_path / "tfds"))
  with pytest.raises(DataError, match=r"could not download .*cifar-100-python.tar.gz.*"
                                      r"--manual_dir.*FC100_\{train,val,test\}.pickle"):
    builders.build(builder)
