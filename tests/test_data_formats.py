"""The readers of `metadiff_jax.data.formats` on tiny fake datasets in every real on-disk
format."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import io
import logging
import pickle
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from data_fixtures import (TIERED_PNG_FORMS, Py2Pickler, dump_py2, write_cifar100_archive,
                           write_cifar_metaoptnet, write_image_folder, write_mini_imagenet_cache,
                           write_mini_imagenet_gidaris, write_mini_imagenet_jpeg,
                           write_tiered_metaoptnet, write_tiered_ren)
from metadiff_jax.data import builders, formats
from metadiff_jax.data.errors import DataError
from metadiff_jax.data.spec import SPLITS, DatasetSpec, standard_spec

# 84x84 formats: few classes and images; CIFAR formats: a few more.
MINI = standard_spec("mini_imagenet").subset({"train": 3, "val": 2, "test": 2}, 4)
TIERED = standard_spec("tiered_imagenet").subset({"train": 3, "val": 2, "test": 2}, 3)
CIFAR_FS = standard_spec("cifar_fs").subset({"train": 3, "val": 2, "test": 2}, 3)
FC100 = standard_spec("fc100").subset({"train": 4, "val": 2, "test": 3}, 3)


def check_round_trip(got: dict, expected: dict, atol: int = 0):
  assert set(got) == set(SPLITS)
  for split in SPLITS:
    g, e = got[split], expected[split]
    assert g.class_names == tuple(e.class_names), split
    assert g.labels.dtype == np.int64
    np.testing.assert_array_equal(g.labels, e.labels)
    assert len(g.images) == len(e.images)
    for i in range(len(e.images)):
      image, want = np.asarray(g.images[i]), np.asarray(e.images[i])
      assert image.dtype == np.uint8 and image.shape == want.shape, (split, i)
      diff = np.abs(image.astype(int) - want.astype(int)).max()
      assert diff <= atol, (split, i, diff)


def check_error(excinfo, *names: str):
  """A one-line DataError naming each of `names` (file names)."""
  message = str(excinfo.value)
  assert isinstance(excinfo.value, DataError)
  assert "\n" not in message
  for name in names:
    assert str(name) in message, (name, message)
  return message


def edit_pickle(path, key, change, py2: bool = False):
  """Replaces item `key` of the pickled object at `path` by `change(item)`; `py2`: the file is
  read as Python 3 reads Python 2 pickles (latin1) and written as Python 2 writes them."""
  obj = pickle.loads(path.read_bytes(), encoding="latin1" if py2 else "ASCII")
  obj[key] = change(obj[key])
  if py2:
    dump_py2(obj, path)
  else:
    path.write_bytes(pickle.dumps(obj))


def decode_all(splits: dict):
  for split in splits.values():
    for i in range(len(split.images)):
      split.images[i]  # pylint: disable=pointless-statement


# --- Python 2 pickles -------------------------------------------------------------------------


def test_py2_pickles_need_the_latin1_fallback(tmp_path):
  obj = {"data": np.arange(200, 256, dtype=np.uint8).reshape(2, 28), "labels": [3, 4]}
  dump_py2(obj, tmp_path / "a.pickle")
  with open(tmp_path / "a.pickle", "rb") as f:
    with pytest.raises(UnicodeDecodeError):
      pickle.load(f)
    f.seek(0)
    loaded = pickle.load(f, encoding="latin1")
  np.testing.assert_array_equal(loaded["data"], obj["data"])
  assert loaded["labels"] == [3, 4]
  assert b"_codecs" not in (tmp_path / "a.pickle").read_bytes()


# --- miniImageNet -----------------------------------------------------------------------------


@pytest.mark.parametrize("py2", [True, False])
@pytest.mark.parametrize("catname2label", [True, False])
def test_mini_imagenet_gidaris(tmp_path, py2, catname2label):
  expected = write_mini_imagenet_gidaris(tmp_path, MINI, 0, py2=py2, catname2label=catname2label)
  assert formats.detect_layout("mini_imagenet", tmp_path) == "gidaris_pickles"
  got = formats.read_mini_imagenet(tmp_path, MINI)
  check_round_trip(got, expected)
  if catname2label:
    assert got["train"].class_names == MINI.classes["train"]
  else:
    assert got["val"].class_names == ("class_64", "class_65")


def test_mini_imagenet_cache(tmp_path):
  expected = write_mini_imagenet_cache(tmp_path, MINI, 1)
  assert formats.detect_layout("mini_imagenet", tmp_path) == "cache_pickles"
  check_round_trip(formats.read_mini_imagenet(tmp_path, MINI), expected)


@pytest.mark.parametrize("size", [(84, 84), (100, 90)])
def test_mini_imagenet_jpeg_with_csv(tmp_path, size):
  expected = write_mini_imagenet_jpeg(tmp_path, MINI, 2, with_csv=True, size=size)
  assert formats.detect_layout("mini_imagenet", tmp_path) == "jpeg"
  got = formats.read_mini_imagenet(tmp_path, MINI)
  assert isinstance(got["train"].images, formats.LazyImages)
  check_round_trip(got, expected, atol=8)  # JPEG (and resizing it) is lossy


def test_mini_imagenet_jpeg_with_packaged_csv(tmp_path):
  spec = standard_spec("mini_imagenet").subset(1, 600)
  expected = write_mini_imagenet_jpeg(tmp_path, spec, 3, with_csv=False)
  got = formats.read_mini_imagenet(tmp_path, spec)
  for split in SPLITS:
    assert got[split].class_names == spec.classes[split]
    np.testing.assert_array_equal(got[split].labels, expected[split].labels)
    for i in (0, 1, 599):
      assert np.abs(got[split].images[i].astype(int) - expected[split].images[i]).max() <= 8


def test_mini_imagenet_prefers_gidaris_pickles(tmp_path):
  write_mini_imagenet_cache(tmp_path, MINI, 0)
  write_mini_imagenet_gidaris(tmp_path, MINI, 0)
  assert formats.detect_layout("mini_imagenet", tmp_path) == "gidaris_pickles"


def test_mini_imagenet_converts_integer_images(tmp_path):
  expected = write_mini_imagenet_cache(tmp_path, MINI, 1)
  edit_pickle(tmp_path / "mini-imagenet-cache-train.pkl", "image_data",
              lambda images: images.astype(np.int64))
  check_round_trip(formats.read_mini_imagenet(tmp_path, MINI), expected)


# --- tieredImageNet ---------------------------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [True, False])
@pytest.mark.parametrize("with_synsets", [True, False])
def test_tiered_ren(tmp_path, bytes_keys, with_synsets):
  expected = write_tiered_ren(tmp_path, TIERED, 4, bytes_keys=bytes_keys,
                              with_synsets=with_synsets)
  assert formats.detect_layout("tiered_imagenet", tmp_path) == "ren_png_pickles"
  got = formats.read_tiered_imagenet(tmp_path, TIERED)
  assert isinstance(got["test"].images, formats.LazyImages)
  check_round_trip(got, expected)
  if with_synsets:
    assert got["train"].class_names == TIERED.classes["train"]


@pytest.mark.parametrize("png_form", TIERED_PNG_FORMS)
def test_tiered_ren_every_png_item_form(tmp_path, png_form):
  # cv2.imencode returns [n, 1] arrays in current OpenCV; the released files hold [n] arrays.
  expected = write_tiered_ren(tmp_path, TIERED, 9, png_form=png_form)
  check_round_trip(formats.read_tiered_imagenet(tmp_path, TIERED), expected)


@pytest.mark.parametrize("bad,what", [
    (None, "NoneType"),
    (np.zeros((84, 84, 3), np.uint8), "uint8 array of shape (84, 84, 3)"),  # decoded pixels
    (np.zeros((7, 2), np.uint8), "uint8 array of shape (7, 2)"),
    (np.linspace(0, 1, 9), "float64 array of shape (9,)"),
    (np.frombuffer(b"n01530575/img.JPEG", np.uint8).reshape(-1, 1), "starts with bytes 6e 30"),
    (b"GARBAGE!", "starts with bytes 47 41"),
])
def test_tiered_ren_refuses_a_non_image_item_when_read(tmp_path, bad, what):
  write_tiered_ren(tmp_path, TIERED, 0, png_form="column")
  edit_pickle(tmp_path / "val_images_png.pkl", 4, lambda _: bad)
  with pytest.raises(DataError) as excinfo:
    formats.read_tiered_imagenet(tmp_path, TIERED)  # before any image is decoded or written
  check_error(excinfo, "val_images_png.pkl", "item 4", what)


def test_tiered_ren_refuses_a_pickle_that_is_not_a_list(tmp_path):
  write_tiered_ren(tmp_path, TIERED, 0)
  (tmp_path / "train_images_png.pkl").write_bytes(pickle.dumps({"images": []}))
  with pytest.raises(DataError) as excinfo:
    formats.read_tiered_imagenet(tmp_path, TIERED)
  check_error(excinfo, "train_images_png.pkl", "not a list of encoded images")


def test_tiered_metaoptnet_flips_bgr_to_rgb(tmp_path):
  expected = write_tiered_metaoptnet(tmp_path, TIERED, 5)
  assert formats.detect_layout("tiered_imagenet", tmp_path) == "metaoptnet_npz"
  got = formats.read_tiered_imagenet(tmp_path, TIERED)
  check_round_trip(got, expected)
  with np.load(tmp_path / "val_images.npz") as stored:
    np.testing.assert_array_equal(stored["images"][..., ::-1], np.asarray(got["val"].images))
  assert got["val"].class_names == ("class_351", "class_353")


def test_tiered_metaoptnet_val_and_test_ids_may_meet(tmp_path):
  expected = write_tiered_metaoptnet(tmp_path, TIERED, 5, id_offsets=(0, 400, 400))
  check_round_trip(formats.read_tiered_imagenet(tmp_path, TIERED), expected)


# --- CIFAR-FS and FC100 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
  return write_cifar100_archive(tmp_path_factory.mktemp("cifar"), 6)


@pytest.mark.parametrize("reader,spec", [(formats.read_cifar_fs, CIFAR_FS),
                                         (formats.read_fc100, FC100)])
def test_cifar_archive(cifar_archive, reader, spec):
  got = reader(cifar_archive.path.parent, spec, archive_md5=cifar_archive.md5)
  check_round_trip(got, cifar_archive.expected(spec))
  assert formats.detect_layout(spec.name, cifar_archive.path.parent) == "cifar100_archive"
  # An explicit archive path (a download) needs no directory.
  got = reader(None, spec, archive_md5=None, archive=cifar_archive.path)
  check_round_trip(got, cifar_archive.expected(spec))


def test_cifar_archive_standard_spec_counts(cifar_archive):
  spec = dataclasses.replace(standard_spec("fc100"), images_per_class=3)
  got = formats.read_fc100(None, spec, archive_md5=None, archive=cifar_archive.path)
  assert [len(got[s].class_names) for s in SPLITS] == [60, 20, 20]
  assert [len(got[s].labels) for s in SPLITS] == [180, 60, 60]


@pytest.mark.parametrize("name,reader,spec", [("CIFAR_FS", formats.read_cifar_fs, CIFAR_FS),
                                              ("FC100", formats.read_fc100, FC100)])
def test_cifar_metaoptnet_pickles(tmp_path, name, reader, spec):
  expected = write_cifar_metaoptnet(tmp_path, name, spec, 7, dtype=np.int64)
  assert formats.detect_layout(spec.name, tmp_path) == "metaoptnet_pickles"
  got = reader(tmp_path, spec)
  check_round_trip(got, expected)
  assert got["train"].class_names == spec.classes["train"]


def test_cifar_metaoptnet_without_fine_ids_warns(tmp_path, caplog):
  expected = write_cifar_metaoptnet(tmp_path, "CIFAR_FS", CIFAR_FS, 8, fine_ids=False)
  with caplog.at_level(logging.WARNING):
    got = formats.read_cifar_fs(tmp_path, CIFAR_FS)
  check_round_trip(got, expected)
  assert "not CIFAR-100 fine ids" in caplog.text
  assert got["train"].class_names == ("class_1000", "class_1003", "class_1006")


# --- image folder -----------------------------------------------------------------------------


def test_image_folder(tmp_path):
  expected = write_image_folder(tmp_path, {"train": 3, "val": 2, "test": 2}, 3, 9, size=(8, 6))
  assert formats.detect_layout("image_folder", tmp_path) == "image_folder"
  got = formats.read_image_folder(tmp_path, image_size=(8, 6))
  check_round_trip(got, expected)
  assert got["train"].class_names == ("train_x", "train_y", "train_z")
  assert len(got["val"].images[1:]) == 5  # a slice stays lazy

  small = formats.read_image_folder(tmp_path, image_size=(5, 4), channels=1)
  assert small["test"].images[0].shape == (5, 4, 1)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset,layouts", [
    ("mini_imagenet", ["gidaris_pickles", "cache_pickles", "jpeg", "MetaOptNet"]),
    ("tiered_imagenet", ["ren_png_pickles", "metaoptnet_npz", "renmengye"]),
    ("cifar_fs", ["cifar100_archive", "metaoptnet_pickles", "cs.toronto.edu"]),
    ("fc100", ["cifar100_archive", "FC100_{train,val,test}.pickle"]),
])
def test_no_known_layout(tmp_path, dataset, layouts):
  (tmp_path / "unrelated.txt").write_text("x")
  for directory in (tmp_path, tmp_path / "missing"):
    with pytest.raises(DataError) as excinfo:
      formats.detect_layout(dataset, directory)
    check_error(excinfo, directory, *layouts)
  reader = {"mini_imagenet": formats.read_mini_imagenet,
            "tiered_imagenet": formats.read_tiered_imagenet, "cifar_fs": formats.read_cifar_fs,
            "fc100": formats.read_fc100}[dataset]
  with pytest.raises(DataError) as excinfo:
    reader(tmp_path, standard_spec(dataset))
  check_error(excinfo, tmp_path, *layouts)


@pytest.mark.parametrize("writer,filename", [
    (write_mini_imagenet_gidaris, "miniImageNet_category_split_val.pickle"),
    (write_mini_imagenet_cache, "mini-imagenet-cache-validation.pkl"),
])
def test_mini_imagenet_missing_split_file(tmp_path, writer, filename):
  writer(tmp_path, MINI, 0)
  (tmp_path / filename).unlink()
  with pytest.raises(DataError) as excinfo:
    formats.read_mini_imagenet(tmp_path, MINI)
  check_error(excinfo, filename, "missing")


@pytest.mark.parametrize("filename", ["test_labels.pkl", "val_images_png.pkl"])
def test_tiered_missing_split_file(tmp_path, filename):
  write_tiered_ren(tmp_path, TIERED, 0)
  (tmp_path / filename).unlink()
  with pytest.raises(DataError) as excinfo:
    formats.read_tiered_imagenet(tmp_path, TIERED)
  check_error(excinfo, filename, "missing")


def test_cifar_missing_split_pickle(tmp_path):
  write_cifar_metaoptnet(tmp_path, "FC100", FC100, 0)
  (tmp_path / "FC100_test.pickle").unlink()
  with pytest.raises(DataError) as excinfo:
    formats.read_fc100(tmp_path, FC100)
  check_error(excinfo, "FC100_test.pickle", "missing", "MetaOptNet")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("writer,filename,reader,spec", [
    (write_mini_imagenet_gidaris, "miniImageNet_category_split_train_phase_train.pickle",
     formats.read_mini_imagenet, MINI),
    (write_mini_imagenet_cache, "mini-imagenet-cache-test.pkl", formats.read_mini_imagenet, MINI),
    (write_tiered_ren, "val_labels.pkl", formats.read_tiered_imagenet, TIERED),
    (write_tiered_ren, "train_images_png.pkl", formats.read_tiered_imagenet, TIERED),
    (write_tiered_metaoptnet, "train_images.npz", formats.read_tiered_imagenet, TIERED),
    (write_tiered_metaoptnet, "test_labels.pkl", formats.read_tiered_imagenet, TIERED),
    (lambda d, s, seed: write_cifar_metaoptnet(d, "CIFAR_FS", s, seed), "CIFAR_FS_val.pickle",
     formats.read_cifar_fs, CIFAR_FS),
])
def test_damaged_files(tmp_path, damage, writer, filename, reader, spec):
  writer(tmp_path, spec, 0)
  path = tmp_path / filename
  data = path.read_bytes()
  if damage == "truncate":
    path.write_bytes(data[:len(data) // 2])
  else:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
  with pytest.raises(DataError) as excinfo:
    reader(tmp_path, spec)
  check_error(excinfo, filename)


def test_hostile_pickle_is_refused(tmp_path):
  write_mini_imagenet_cache(tmp_path, MINI, 0)

  class Boom:
    def __reduce__(self):
      return (print, ("this must not run",))

  (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"image_data": Boom()}))
  with pytest.raises(DataError) as excinfo:
    formats.read_mini_imagenet(tmp_path, MINI)
  check_error(excinfo, "mini-imagenet-cache-train.pkl", "builtins.print")


def test_corrupt_png_in_ren_pickle(tmp_path):
  write_tiered_ren(tmp_path, TIERED, 0)
  edit_pickle(tmp_path / "test_images_png.pkl", 2, lambda png: png[:40])  # a cut-off PNG
  got = formats.read_tiered_imagenet(tmp_path, TIERED)
  with pytest.raises(DataError) as excinfo:
    decode_all(got)
  check_error(excinfo, "test_images_png.pkl", "item 2")


def test_cifar_archive_wrong_md5(cifar_archive):
  with pytest.raises(DataError) as excinfo:
    formats.read_cifar_fs(cifar_archive.path.parent, CIFAR_FS)
  check_error(excinfo, "cifar-100-python.tar.gz", formats.CIFAR100_MD5, cifar_archive.md5,
              formats.CIFAR100_URL)


def test_cifar_archive_truncated(tmp_path, cifar_archive):
  data = cifar_archive.path.read_bytes()
  (tmp_path / "cifar-100-python.tar.gz").write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError) as excinfo:
    formats.read_fc100(tmp_path, FC100, archive_md5=None)
  check_error(excinfo, "cifar-100-python.tar.gz")


def test_fc100_archive_with_inconsistent_coarse_labels(tmp_path):
  archive = write_cifar100_archive(tmp_path, 0, 1, 1, wrong_coarse=True)
  spec = FC100.subset(None, 2)
  with pytest.raises(DataError) as excinfo:
    formats.read_fc100(tmp_path, spec, archive_md5=archive.md5)
  check_error(excinfo, "cifar-100-python.tar.gz", "superclass")
  formats.read_cifar_fs(tmp_path, CIFAR_FS.subset(None, 2), archive_md5=archive.md5)


# --- the CIFAR-100 download (only ever to 127.0.0.1) ----------------------------------------


@pytest.fixture
def loopback_only(monkeypatch):
  """No proxy, so a request to 127.0.0.1 stays on this machine."""
  for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("no_proxy", "*")
  monkeypatch.setenv("NO_PROXY", "*")


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _archive_server(data: bytes, mode: str = "ok"):
  """An HTTP server on 127.0.0.1 serving `data`; yields its URL for the archive.

  mode "ok" sends it all, "stall" sends the headers and half the data and then nothing.
  """
  release = threading.Event()

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802  (the http.server name)
      self.send_response(200)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      if mode == "ok":
        self.wfile.write(data)
      else:
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        release.wait(30)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/{formats.CIFAR100_ARCHIVE}"
  finally:
    release.set()
    server.shutdown()
    server.server_close()


def _build_offline(tmp_path, name: str = "fc100", manual_dir=None) -> tuple[str, float]:
  """Builds `name` from nothing; returns the one-line error and the seconds it took."""
  builder = builders.make_builder(name, str(tmp_path / "tfds"),
                                  None if manual_dir is None else str(manual_dir))
  start = time.monotonic()
  with pytest.raises(DataError) as excinfo:
    builders.build(builder)
  elapsed = time.monotonic() - start
  message = check_error(excinfo, formats.CIFAR100_ARCHIVE, formats.CIFAR100_MD5, "--manual_dir")
  assert not (tmp_path / "tfds" / "downloads" / formats.CIFAR100_ARCHIVE).exists()
  return message, elapsed


def test_cifar_download_refused_stops_at_once(tmp_path, monkeypatch, loopback_only):
  url = f"http://127.0.0.1:{_closed_port()}/{formats.CIFAR100_ARCHIVE}"
  monkeypatch.setattr(builders, "CIFAR100_URL", url)
  message, elapsed = _build_offline(tmp_path)
  assert url in message and "refused" in message, message
  assert "--manual_dir DIR, DIR holding cifar-100-python.tar.gz" in message
  assert "FC100_{train,val,test}.pickle" in message
  assert elapsed < 30, elapsed  # with the default limits: one attempt, no retries


def test_cifar_download_without_an_answer_gives_up(tmp_path, monkeypatch, loopback_only):
  # A port that accepts connections but never answers: what a filtered network looks like.
  with socket.socket() as silent:
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/{formats.CIFAR100_ARCHIVE}"
    monkeypatch.setattr(builders, "CIFAR100_URL", url)
    monkeypatch.setattr(builders, "DOWNLOAD_ANSWER_S", 1.0)
    message, elapsed = _build_offline(tmp_path, "cifar_fs")
  assert "no answer within 1 s" in message and url in message, message
  assert "CIFAR_FS_{train,val,test}.pickle" in message
  assert elapsed < 30, elapsed


def test_cifar_download_with_a_hanging_name_lookup_gives_up(tmp_path, monkeypatch,
                                                           loopback_only):
  # Where DNS is unreachable, getaddrinfo blocks for its own timeouts, which no socket timeout
  # bounds. The lookup here never leaves the process: it sleeps, then fails.
  def hanging_lookup(*args, **kwargs):
    time.sleep(60)
    raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

  monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
  monkeypatch.setattr(builders, "CIFAR100_URL", "http://cifar.invalid/cifar-100-python.tar.gz")
  monkeypatch.setattr(builders, "DOWNLOAD_ANSWER_S", 1.0)
  message, elapsed = _build_offline(tmp_path)
  assert "no answer within 1 s" in message and "http://cifar.invalid/" in message, message
  assert elapsed < 30, elapsed  # the build did not wait for the lookup


def test_cifar_download_names_the_manual_dir_that_lacks_the_files(tmp_path, monkeypatch,
                                                                   loopback_only):
  monkeypatch.setattr(builders, "CIFAR100_URL", f"http://127.0.0.1:{_closed_port()}/x.tar.gz")
  (tmp_path / "mine").mkdir()
  message, _ = _build_offline(tmp_path, manual_dir=tmp_path / "mine")
  assert f"{tmp_path / 'mine'} holds neither cifar-100-python.tar.gz nor" in message
  assert f"--manual_dir {tmp_path / 'mine'}," in message


def test_cifar_download_that_stalls_leaves_nothing(tmp_path, monkeypatch, loopback_only):
  monkeypatch.setattr(builders, "DOWNLOAD_STALL_S", 1.0)
  path = tmp_path / formats.CIFAR100_ARCHIVE
  with _archive_server(bytes(range(256)) * 64, mode="stall") as url:
    with pytest.raises(builders.DownloadFailed, match="stopped after"):
      builders.download_file(url, str(path), None)
  assert list(tmp_path.iterdir()) == []


def test_cifar_download_checks_md5_then_builds_and_is_reused(tmp_path, monkeypatch,
                                                              loopback_only, cifar_archive):
  data = cifar_archive.path.read_bytes()
  with _archive_server(data) as url:
    with pytest.raises(builders.DownloadFailed, match=f"has md5 {cifar_archive.md5}, not 0+"):
      builders.download_file(url, str(tmp_path / "bad" / "a.tar.gz"), "0" * 32)
    assert list((tmp_path / "bad").iterdir()) == []
    # A damaged earlier copy is not trusted: it is downloaded again.
    downloaded = tmp_path / "tfds" / "downloads" / formats.CIFAR100_ARCHIVE
    downloaded.parent.mkdir(parents=True)
    downloaded.write_bytes(data[:100])
    monkeypatch.setattr(builders, "CIFAR100_URL", url)
    builders.build(builders.make_builder("fc100", str(tmp_path / "tfds"), spec=FC100,
                                         archive_md5=cifar_archive.md5))
  assert downloaded.read_bytes() == data
  # Once there, the archive is used without a network.
  monkeypatch.setattr(builders, "CIFAR100_URL", f"http://127.0.0.1:{_closed_port()}/x")
  builders.build(builders.make_builder("cifar_fs", str(tmp_path / "tfds"), spec=CIFAR_FS,
                                       archive_md5=cifar_archive.md5))


def test_wrong_class_set(tmp_path):
  write_mini_imagenet_gidaris(tmp_path, MINI, 0)
  spec = standard_spec("mini_imagenet").subset({"train": 4, "val": 2, "test": 2}, 4)
  with pytest.raises(DataError) as excinfo:
    formats.read_mini_imagenet(tmp_path, spec)
  message = check_error(excinfo, "miniImageNet_category_split_train_phase_train.pickle")
  assert spec.classes["train"][3] in message and "1 missing" in message


@pytest.mark.parametrize("writer", [write_tiered_metaoptnet,
                                    lambda d, s, seed: write_tiered_ren(d, s, seed,
                                                                        with_synsets=False)])
def test_wrong_class_count(tmp_path, writer):
  writer(tmp_path, TIERED, 0)
  spec = standard_spec("tiered_imagenet").subset({"train": 3, "val": 3, "test": 2}, 3)
  with pytest.raises(DataError) as excinfo:
    formats.read_tiered_imagenet(tmp_path, spec)
  check_error(excinfo, "val_labels.pkl", "2 classes", "wants 3")


@pytest.mark.parametrize("writer,reader,spec,filename", [
    (write_mini_imagenet_cache, formats.read_mini_imagenet, MINI, "mini-imagenet-cache-train.pkl"),
    (write_mini_imagenet_jpeg, formats.read_mini_imagenet, MINI, "train.csv"),
    (write_tiered_metaoptnet, formats.read_tiered_imagenet, TIERED, "train_labels.pkl"),
])
def test_wrong_images_per_class(tmp_path, writer, reader, spec, filename):
  writer(tmp_path, spec, 0)
  with pytest.raises(DataError) as excinfo:
    reader(tmp_path, spec.subset(None, spec.images_per_class + 1))
  check_error(excinfo, filename, f"wants {spec.images_per_class + 1} per class")


def test_wrong_image_shape(tmp_path):
  write_mini_imagenet_gidaris(tmp_path, MINI, 0)
  with pytest.raises(DataError) as excinfo:
    formats.read_mini_imagenet(tmp_path, dataclasses.replace(MINI, image_shape=(32, 32, 3)))
  check_error(excinfo, "miniImageNet_category_split_train_phase_train.pickle", "[n, 32, 32, 3]")


def test_wrong_image_shape_in_png_pickle(tmp_path):
  write_tiered_ren(tmp_path, TIERED, 0)
  with pytest.raises(DataError) as excinfo:
    formats.read_tiered_imagenet(tmp_path, dataclasses.replace(TIERED, image_shape=(80, 80, 3)))
  check_error(excinfo, "train_images_png.pkl", "[80, 80, 3]")


def test_images_that_do_not_fit_uint8(tmp_path):
  write_cifar_metaoptnet(tmp_path, "CIFAR_FS", CIFAR_FS, 0)
  edit_pickle(tmp_path / "CIFAR_FS_test.pickle", "data", lambda data: data.astype(np.int64) * 2,
              py2=True)
  with pytest.raises(DataError) as excinfo:
    formats.read_cifar_fs(tmp_path, CIFAR_FS)
  check_error(excinfo, "CIFAR_FS_test.pickle", "uint8")


def test_non_integer_labels(tmp_path):
  write_tiered_metaoptnet(tmp_path, TIERED, 0)
  edit_pickle(tmp_path / "val_labels.pkl", "labels", lambda labels: [float("nan")] + labels[1:],
              py2=True)
  with pytest.raises(DataError) as excinfo:
    formats.read_tiered_imagenet(tmp_path, TIERED)
  check_error(excinfo, "val_labels.pkl", "non-finite")


def test_overlapping_classes_across_splits(tmp_path):
  overlapping = DatasetSpec("mini_imagenet", {"train": MINI.classes["train"],
                                              "val": MINI.classes["train"][1:],
                                              "test": MINI.classes["test"]}, 4, (84, 84, 3))
  write_mini_imagenet_cache(tmp_path, overlapping, 0)
  with pytest.raises(DataError) as excinfo:
    formats.read_mini_imagenet(tmp_path, overlapping)
  check_error(excinfo, "mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-train.pkl",
              "disjoint", MINI.classes["train"][1])


def test_overlapping_ids_across_splits(tmp_path):
  write_tiered_metaoptnet(tmp_path, TIERED, 0, id_offsets=(0, 2, 400))
  with pytest.raises(DataError) as excinfo:
    formats.read_tiered_imagenet(tmp_path, TIERED)
  check_error(excinfo, "val_labels.pkl", "class_2", "disjoint")


def test_missing_jpeg(tmp_path):
  write_mini_imagenet_jpeg(tmp_path, MINI, 0)
  listed = sorted((tmp_path / "images").glob(f"{MINI.classes['val'][0]}*.jpg"))
  for path in listed[:2]:
    path.unlink()
  with pytest.raises(DataError) as excinfo:
    formats.read_mini_imagenet(tmp_path, MINI)
  check_error(excinfo, listed[0].name, "2 of the 8 images")


def test_image_folder_undecodable_image(tmp_path):
  write_image_folder(tmp_path, 2, 2, 0)
  bad = tmp_path / "val" / "val_z" / "img_001.PNG"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
  got = formats.read_image_folder(tmp_path, image_size=(8, 8))
  with pytest.raises(DataError) as excinfo:
    decode_all(got)
  check_error(excinfo, bad)


def test_image_folder_class_in_two_splits(tmp_path):
  write_image_folder(tmp_path, 2, 2, 0)
  shutil.copytree(tmp_path / "train" / "train_z", tmp_path / "test" / "train_z")
  with pytest.raises(DataError) as excinfo:
    formats.read_image_folder(tmp_path)
  check_error(excinfo, "train_z", tmp_path / "test", "train split")


@pytest.mark.parametrize("damage,name", [
    (lambda root: shutil.rmtree(root / "val"), "val"),
    (lambda root: shutil.rmtree(root / "test" / "test_y"), "test"),
    (lambda root: [p.unlink() for p in (root / "train" / "train_y").glob("img_*")], "train_y"),
    (lambda root: shutil.rmtree(root), "root"),
])
def test_image_folder_layout_errors(tmp_path, damage, name):
  root = tmp_path / "root"
  write_image_folder(root, 2, 2, 0)
  damage(root)
  with pytest.raises(DataError) as excinfo:
    formats.read_image_folder(root)
  check_error(excinfo, name, "{train,val,test}/<class name>")


def test_py2_pickler_writes_loadable_arrays():
  buf = io.BytesIO()
  image = np.asarray(Image.new("RGB", (3, 2), (250, 1, 128)))
  Py2Pickler(buf).dump({"x": image})
  np.testing.assert_array_equal(pickle.loads(buf.getvalue(), encoding="latin1")["x"], image)
