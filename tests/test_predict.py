"""Few-shot prediction on new images (`metadiff_jax.predict`) with a tiny trained workdir.

The workdir (conftest's `trained_workdir`) was trained on the tiny glyph set's base classes;
the images classified here are of its test classes, which neither the backbone nor the
denoiser saw.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from tiny_pipeline import cpu_env
from metadiff_jax import predict, prototypes
from metadiff_jax.errors import ConfigError, StageError


def run_predict(*args):
  return subprocess.run([sys.executable, "-m", "metadiff_jax.predict", *args], cwd=REPO,
                        env=cpu_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def example(trained_workdir, tmp_path_factory):
  """One 5-way 5-shot episode of test classes as folders: (support dir, query dir)."""
  out = tmp_path_factory.mktemp("example")
  return predict.export_example(trained_workdir, out, ways=5, shots=5, queries=10)


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def folder_images(folder):
  """class -> [uint8 [H, W, C] images] of a class-per-subfolder folder, sorted."""
  out = {}
  for name in sorted(os.listdir(folder)):
    files = sorted(os.listdir(os.path.join(folder, name)))
    out[name] = [np.asarray(Image.open(os.path.join(folder, name, f)))[..., None] for f in files]
  return out


def test_the_command_classifies_held_out_glyphs_well_above_chance(trained_workdir, example,
                                                                  tmp_path):
  support, query = example
  out = tmp_path / "predictions.csv"
  proc = run_predict("--workdir", trained_workdir, "--support", support, "--query", query,
                     "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = read_csv(out)
  classes = sorted(os.listdir(support))
  assert len(rows) == 50
  assert list(rows[0]) == ["query", "predicted", "true", *(f"p({c})" for c in classes)]
  probabilities = np.array([[float(r[f"p({c})"]) for c in classes] for r in rows])
  np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
  assert all(r["predicted"] == classes[int(np.argmax(p))] for r, p in zip(rows, probabilities))
  assert all(r["true"] == os.path.basename(os.path.dirname(r["query"])) for r in rows)
  accuracy = np.mean([r["predicted"] == r["true"] for r in rows])
  # Chance is 20% (5 ways); the tiny run measured 96% here. At least 60% is a margin of 40
  # points above chance that a model ignoring the support set cannot reach.
  assert accuracy >= 0.6, accuracy
  assert f"accuracy {100 * accuracy:.2f}%" in proc.stdout
  assert "5-shot denoiser" in proc.stdout

  # The Python function gives the same predictions (same seed, same noise).
  result = predict.predict(trained_workdir, support, query)
  assert result.classes == tuple(classes) and result.shots == 5 and result.resized == 0
  np.testing.assert_allclose(result.probabilities, probabilities, atol=2e-6)
  assert result.accuracy == pytest.approx(accuracy)


def test_arrays_give_the_same_predictions_as_files(trained_workdir, example):
  support, query = example
  by_file = predict.predict(trained_workdir, support, query)
  support_arrays = folder_images(support)
  query_arrays = np.stack([im for ims in folder_images(query).values() for im in ims])
  by_array = predict.predict(trained_workdir, support_arrays, query_arrays)
  assert by_array.classes == by_file.classes and by_array.true is None
  np.testing.assert_allclose(by_array.probabilities, by_file.probabilities, atol=1e-6)
  # Floats in [0, 1] and [H, W] arrays are read as the same pixels.
  floats = {c: [im[..., 0] / 255.0 for im in ims] for c, ims in support_arrays.items()}
  np.testing.assert_allclose(predict.predict(trained_workdir, floats, query_arrays).probabilities,
                             by_file.probabilities, atol=1e-6)


def test_images_of_another_size_or_colour_are_converted_and_counted(trained_workdir, example,
                                                                    tmp_path):
  support, query = example
  colour = tmp_path / "colour"
  for name, images in folder_images(support).items():
    os.makedirs(colour / name)
    for i, im in enumerate(images):  # grey as RGB: converting back is exact
      Image.fromarray(np.repeat(im, 3, axis=-1)).save(colour / name / f"{i}.png")
  base = predict.predict(trained_workdir, support, query)
  same = predict.predict(trained_workdir, str(colour), query)
  assert same.resized == 0
  np.testing.assert_allclose(same.probabilities, base.probabilities, atol=1e-6)

  large = tmp_path / "large"
  for name, images in folder_images(support).items():
    os.makedirs(large / name)
    for i, im in enumerate(images):
      Image.fromarray(im[..., 0]).resize((40, 30)).save(large / name / f"{i}.jpg")
  resized = predict.predict(trained_workdir, str(large), query)
  assert resized.resized == 25
  assert resized.accuracy >= 0.5  # still classifies: the size is only changed back
  proc = run_predict("--workdir", trained_workdir, "--support", str(large), "--query", query,
                     "--out", str(tmp_path / "p.csv"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "25 images resized" in proc.stdout
  assert "resized 25 of 75 images to the backbone's input 16x16" in proc.stderr


def test_more_classes_than_the_denoiser_was_trained_on(trained_workdir, tmp_path):
  # The tiny set has 8 test classes; the denoisers were trained on 5-way episodes.
  support, query = predict.export_example(trained_workdir, tmp_path, ways=8, shots=1,
                                          queries=5)
  result = predict.predict(trained_workdir, support, query)
  assert len(result.classes) == 8 and result.probabilities.shape == (40, 8)
  assert result.shots == 1  # one image per class: the 1-shot denoiser
  assert result.accuracy > 1 / 8


def test_the_shot_setting_and_the_class_mean_method(trained_workdir, example, tmp_path):
  support, query = example
  assert predict.predict(trained_workdir, support, query, shots=1).shots == 1
  # Three images per class lie as near to 1 as to 5: the tie goes to fewer shots.
  three = tmp_path / "three"
  for name in os.listdir(support):
    os.makedirs(three / name)
    for f in sorted(os.listdir(os.path.join(support, name)))[:3]:
      shutil.copy(os.path.join(support, name, f), three / name / f)
  assert predict.predict(trained_workdir, str(three), query).shots == 1
  # Uneven classes work (with a warning in the log).
  os.remove(three / sorted(os.listdir(three))[0] / sorted(os.listdir(three / sorted(
      os.listdir(three))[0]))[0])
  assert predict.predict(trained_workdir, str(three), query).probabilities.shape == (50, 5)

  # method="prototypes": cosine x 10 against the support's class means, computed here.
  predictor = predict.Predictor(trained_workdir)
  means = predict.predict(trained_workdir, support, query, method="prototypes")
  assert means.shots is None
  support_images = folder_images(support)
  features = predictor.embed(np.stack([im for ims in support_images.values() for im in ims]))
  labels = np.repeat(np.arange(5), 5)
  query_features = predictor.embed(np.stack(
      [im for ims in folder_images(query).values() for im in ims]))
  logits = np.asarray(prototypes.cosine_logits(
      query_features, prototypes.class_means(features, labels, 5), scale=10.0))
  expected = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(means.probabilities, expected / expected.sum(1, keepdims=True),
                             atol=1e-5)


def test_the_seed_sets_the_noise(trained_workdir, example):
  support, query = example
  a = predict.predict(trained_workdir, support, query, seed=3)
  b = predict.predict(trained_workdir, support, query, seed=3)
  np.testing.assert_array_equal(a.probabilities, b.probabilities)
  c = predict.predict(trained_workdir, support, query, seed=4)
  assert not np.array_equal(a.probabilities, c.probabilities)


# ----------------------------------------------------------------------------- bad input

def test_bad_support_and_query_sets(trained_workdir, example, tmp_path):
  support, query = example
  with pytest.raises(predict.PredictError, match="support folder .* does not exist"):
    predict.predict(trained_workdir, tmp_path / "absent", query)
  one = tmp_path / "one"
  shutil.copytree(os.path.join(support, sorted(os.listdir(support))[0]), one / "a")
  with pytest.raises(predict.PredictError, match="has 1 class.*needs at least 2"):
    predict.predict(trained_workdir, one, query)
  empty = tmp_path / "empty"
  shutil.copytree(support, empty)
  name = sorted(os.listdir(empty))[1]
  for f in os.listdir(empty / name):
    os.remove(empty / name / f)
  (empty / name / "notes.txt").write_text("not an image")
  with pytest.raises(predict.PredictError, match=f"class '{re.escape(name)}' .* has no images"):
    predict.predict(trained_workdir, empty, query)
  broken = tmp_path / "broken"
  shutil.copytree(support, broken)
  bad = broken / name / "000.png"
  next(iter(sorted((broken / name).iterdir()))).rename(bad)
  bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  with pytest.raises(predict.PredictError, match=r"cannot read image .*000\.png"):
    predict.predict(trained_workdir, broken, query)
  with pytest.raises(predict.PredictError, match="query .*nowhere.png does not exist"):
    predict.predict(trained_workdir, support, [tmp_path / "nowhere.png"])
  (tmp_path / "no_images").mkdir()
  with pytest.raises(predict.PredictError, match="no query images"):
    predict.predict(trained_workdir, support, tmp_path / "no_images")
  with pytest.raises(predict.PredictError, match="array of shape"):
    predict.predict(trained_workdir, support, [np.zeros((4, 4, 2), np.uint8)])
  with pytest.raises(predict.PredictError, match="unknown method"):
    predict.predict(trained_workdir, support, query, method="knn")
  # The command: one line, exit status 2, no CSV.
  out = tmp_path / "p.csv"
  proc = run_predict("--workdir", trained_workdir, "--support", str(broken), "--query", query,
                     "--out", str(out))
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: cannot read")
  assert not out.exists()


def test_workdirs_without_a_trained_model(trained_workdir, example, tmp_path):
  support, query = example
  (tmp_path / "nothing").mkdir()
  with pytest.raises(ConfigError, match="no config.json in .*nothing"):
    predict.predict(tmp_path / "nothing", support, query)
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(os.path.join(trained_workdir, "config.json"), partial)
  with pytest.raises(StageError, match="no trained backbone in .*pretrain/best"):
    predict.predict(partial, support, query)
  shutil.copytree(os.path.join(trained_workdir, "pretrain"), partial / "pretrain")
  with pytest.raises(StageError, match=r"no trained denoiser in .*train_<K>shot/best.*"
                                       r"method='prototypes'"):
    predict.predict(partial, support, query)
  # The class means need no denoiser.
  assert predict.predict(partial, support, query, method="prototypes").accuracy >= 0.6
  with pytest.raises(StageError, match="no trained 3-shot denoiser"):
    predict.predict(trained_workdir, support, query, shots=3)
  # A backbone that does not fit the config names the first mismatching variable.
  config = json.loads((partial / "config.json").read_text())
  config["backbone"]["name"] = "resnet12"
  (partial / "config.json").write_text(json.dumps(config))
  with pytest.raises(StageError, match=r"backbone in .*pretrain/best has `params/layer1/bn/bias` of "
                                       r"shape \(64,\), which the configured model lacks"):
    predict.Predictor(partial)
  proc = run_predict("--workdir", str(tmp_path / "nothing"), "--support", support, "--query",
                     query)
  assert proc.returncode == 2 and proc.stderr.startswith("error: no config.json")
  assert proc.stderr.strip().count("\n") == 0


def test_a_workdirs_config_reads_back_as_written(trained_workdir, tmp_path):
  from tiny_pipeline import load_config  # pylint: disable=g-import-not-at-top
  config = load_config("from_workdir", trained_workdir)
  with open(os.path.join(trained_workdir, "config.json")) as f:
    written = json.load(f)
  assert json.loads(json.dumps(config.to_dict())) == written
  assert config.train.shots == (1, 5) and isinstance(config.denoiser.inputs, tuple)
  with pytest.raises(AttributeError):  # locked, as every config file's
    config.train.stpes = 3
  with pytest.raises(ConfigError, match="needs the workdir after a colon"):
    load_config("from_workdir")
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="cannot read .*config.json"):
    load_config("from_workdir", str(tmp_path))


# ----------------------------------------------------------------------------- query folders

def test_a_mixed_query_folder_keeps_the_true_classes_it_has(trained_workdir, example, tmp_path,
                                                            capsys):
  """Class folders beside loose files and a subfolder of no class: the class folders' images
  keep their true classes, the accuracy is over them, and the table shows paths relative to
  the query folder (every class folder holds 000.png, so bare names would repeat)."""
  support, query = example
  mixed = tmp_path / "mixed"
  classes = sorted(os.listdir(support))
  for c in classes:  # numbered per class, as a user's folders often are
    os.makedirs(mixed / c)
    for j, f in enumerate(sorted(os.listdir(os.path.join(query, c)))):
      shutil.copy(os.path.join(query, c, f), mixed / c / f"{j:03d}.png")
  shutil.copy(mixed / classes[0] / "000.png", mixed / "loose.png")
  os.makedirs(mixed / "unsorted")
  shutil.copy(mixed / classes[1] / "001.png", mixed / "unsorted" / "000.png")

  result = predict.predict(trained_workdir, support, str(mixed))
  by_name = dict(zip(result.query_names, range(len(result.queries))))
  assert len(by_name) == 52  # relative paths: no two alike
  assert result.labelled == 50
  assert result.true[by_name["loose.png"]] is None
  assert result.true[by_name[os.path.join("unsorted", "000.png")]] is None
  for c in classes:
    assert result.true[by_name[os.path.join(c, "000.png")]] == c
  labelled = [i for i, t in enumerate(result.true) if t is not None]
  expected = np.mean([result.predicted[i] == result.true[i] for i in labelled])
  assert result.accuracy == pytest.approx(expected)

  out = tmp_path / "p.csv"
  assert predict.main(["--workdir", trained_workdir, "--support", support, "--query",
                       str(mixed), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  lines = printed.splitlines()
  assert lines[0].startswith("query ") and lines[0].endswith("true")
  for line, name in zip(lines[1:21], result.query_names[:20]):
    assert line.startswith(f"{name}  "), (line, name)
  assert any(line.startswith(f"{os.path.join(classes[0], '000.png')} ") for line in lines)
  assert f"accuracy {100 * result.accuracy:.2f}% (50 of 52 queries labelled)" in printed
  rows = {os.path.relpath(r["query"], mixed): r for r in read_csv(out)}
  assert rows["loose.png"]["true"] == "" and rows[os.path.join(classes[0], "000.png")]["true"]


def test_query_names_are_relative_to_the_query_folders(tmp_path):
  for path in ("q/a/x.png", "q/b/x.png", "q/x.png", "r/x.png", "r/a/deep/x.png"):
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / path)
  items, true, shown = predict.query_set(tmp_path / "q", classes=("a", "b"))
  assert shown == ["x.png", os.path.join("a", "x.png"), os.path.join("b", "x.png")]
  assert true == [None, "a", "b"]
  # Several folders: relative to their common parent, so that they stay apart; a subfolder
  # not named after a class gives none, and a class folder's images at any depth its class.
  items, true, shown = predict.query_set([tmp_path / "q", tmp_path / "r"], classes=("a",))
  assert shown == [os.path.join("q", "x.png"), os.path.join("q", "a", "x.png"),
                   os.path.join("q", "b", "x.png"), os.path.join("r", "x.png"),
                   os.path.join("r", "a", "deep", "x.png")]
  assert true == [None, "a", None, None, "a"]
  # No class folder at all: no true classes; files one by one and arrays keep their names.
  items, true, shown = predict.query_set([tmp_path / "r" / "x.png",
                                          np.zeros((4, 4), np.uint8)], classes=("a",))
  assert true is None and shown == ["x.png", "query[1]"]
