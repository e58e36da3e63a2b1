"""TFDS builders that write the few-shot datasets as array_record files, with no TensorFlow.

Each builder reads a user's files with `formats` (or generates an embedded set, `embedded`)
and writes splits `train` / `val` / `test` of examples `{"image": uint8 [H, W, C], "label":
int64}`. Labels are within-split class indices 0..C-1; the class names of each split are stored
in the dataset's metadata (`metadata.json`, key "class_names"). Images are
`tfds.features.Tensor` rather than `tfds.features.Image`, because encoding an Image feature
needs TensorFlow; array_record files are then read by `tfds.data_source` with TensorFlow absent
(`load.py`).

Records keep their generation order (`disable_shuffling`): record i of a split is image i of
the source in the order the source lists them, so a built split is a pure function of its
source files.

Every build stores the per-channel mean and standard deviation of its train split's pixels in
[0, 1] (metadata key "normalization"); a user's image folder is normalised with them
(`augment.from_config`), the named datasets with the constants of the literature. An image
folder's build also stores a fingerprint of its source files (relative names, sizes,
modification times, and the image size and channels asked for, metadata key "source"), so that
building it again after the files changed rebuilds it instead of keeping the old one (`build`).

The builders are not put in TFDS's global registry (the name `image_folder` is TFDS's own);
`load.py` opens what they write by path, and `BUILDERS` maps our dataset names to them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from metadiff_jax.data import embedded, formats, glyphs, spec as spec_lib, textures
from metadiff_jax.data.errors import DataError

SPLITS = spec_lib.SPLITS
# Where CIFAR-FS and FC100 fetch the CIFAR-100 archive when no files are given (a module
# attribute read at call time, so tests can point it at a closed local port).
CIFAR100_URL = formats.CIFAR100_URL
# The download gives up when the server has not answered (name lookup, connect, response
# headers) within DOWNLOAD_ANSWER_S, or when its data pause for DOWNLOAD_STALL_S. TFDS's own
# downloader has no timeout and retries ten times, so without a network it never says anything.
DOWNLOAD_ANSWER_S = 15.0
DOWNLOAD_STALL_S = 60.0


class FewShotBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: turns `read_splits()` -> {split: RawSplit} into array_record splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # Where the files come from, shown by `python -m metadiff_jax.data build --help` and errors.
  SOURCE = ""
  # The class of its builder configs (made per call, so a custom size can be named); None for
  # a dataset without configs.
  CONFIG_CLASS: type[tfds.core.BuilderConfig] | None = None

  def __init__(self, *, data_dir: str, manual_dir: str | None = None,
               spec: spec_lib.DatasetSpec | None = None, **kwargs):
    """Args:
      data_dir: where TFDS datasets live (the dataset goes to data_dir/<name>/<config>/<ver>).
      manual_dir: the directory holding the user's files.
      spec: what the files must contain; the standard spec of the dataset by default
        (`spec.subset(...)` for a few classes).
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder`.
    """
    self._manual = None if manual_dir is None else os.path.expanduser(str(manual_dir))
    self._spec = spec
    self._class_names: dict[str, tuple[str, ...]] = {}
    super().__init__(data_dir=os.path.expanduser(str(data_dir)), file_format="array_record",
                     **kwargs)

  # --- what subclasses define ---------------------------------------------------------------

  def image_shape(self) -> tuple[int, int, int]:
    return self.spec.image_shape

  @property
  def spec(self) -> spec_lib.DatasetSpec:
    if self._spec is None:
      self._spec = spec_lib.standard_spec(self.name)
    return self._spec

  def read_splits(self, dl_manager) -> dict[str, formats.RawSplit]:
    raise NotImplementedError

  # --- TFDS -------------------------------------------------------------------------------

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.image_shape(), dtype=np.uint8),
            "label": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
        homepage=self.SOURCE or None,
    )

  # TFDS prints a banner to stdout before a build ("Downloading and preparing dataset Unknown
  # size ...": TFDS downloads nothing here) and after it; the command prints what it built.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def manual_dir(self) -> str:
    if self._manual is None:
      raise DataError(f"{self.name} needs --manual_dir: the directory holding its files "
                      f"({self.SOURCE})")
    if not os.path.isdir(self._manual):
      raise DataError(f"manual directory {self._manual} does not exist; pass the directory "
                      f"holding the {self.name} files ({self.SOURCE})")
    return self._manual

  def _split_generators(self, dl_manager):
    raw = self.read_splits(dl_manager)
    for split, data in raw.items():
      self._class_names[split] = tuple(data.class_names)
    self.info.metadata["class_names"] = {s: list(n) for s, n in self._class_names.items()}
    self.info.metadata["num_classes"] = {s: len(n) for s, n in self._class_names.items()}
    return {split: self._generate_examples(split, raw[split]) for split in SPLITS}

  def _generate_examples(self, split: str, data: formats.RawSplit):
    shape = tuple(self.image_shape())
    labels = np.asarray(data.labels, np.int64)
    # A hash of the content, stored in the metadata, names this build in the feature cache's
    # key: a rebuild from other files never reuses features of the old one.
    content = hashlib.sha256(repr((shape, len(labels))).encode())
    stats = PixelStats(shape[-1]) if split == "train" else None
    for i in range(len(labels)):
      image = np.asarray(data.images[i])
      if image.shape != shape or image.dtype != np.uint8:
        raise DataError(f"{self.name}/{split} image {i}: shape {image.shape} dtype {image.dtype},"
                        f" expected {shape} uint8")
      content.update(np.ascontiguousarray(image).tobytes())
      content.update(labels[i].tobytes())
      if stats is not None:
        stats.add(image)
      yield i, {"image": image, "label": labels[i]}
    self.info.metadata.setdefault("content_sha256", {})[split] = content.hexdigest()
    if stats is not None:
      self.info.metadata["normalization"] = stats.as_dict()


class PixelStats:
  """Per-channel mean and standard deviation of uint8 images, as pixels in [0, 1].

  Sums are exact integers, so the result does not depend on the order or the batching of the
  images (the standard deviation is the population one, numpy's default).
  """

  def __init__(self, channels: int):
    self.count = 0
    self.sums = np.zeros(channels, np.int64)
    self.squares = np.zeros(channels, np.int64)

  def add(self, image: np.ndarray) -> None:
    """Adds one uint8 [H, W, C] image."""
    pixels = image.reshape(-1, image.shape[-1]).astype(np.int64)
    self.count += len(pixels)
    self.sums += pixels.sum(0)
    self.squares += np.square(pixels).sum(0)

  def as_dict(self) -> dict:
    """{"mean": [C], "std": [C], "pixels": n} in [0, 1] units."""
    n = max(self.count, 1)
    mean = self.sums / n
    var = np.maximum(self.squares / n - np.square(mean), 0.0)
    return {"mean": [float(m) for m in mean / 255.0],
            "std": [float(s) for s in np.sqrt(var) / 255.0],
            "split": "train", "pixels": int(self.count)}


class MiniImagenet(FewShotBuilder, skip_registration=True):
  """miniImageNet (Vinyals et al. 2016; the Ravi & Larochelle 2017 split): 64/16/20 classes of
  600 84x84 images, from the Gidaris/MetaOptNet pickles, the "cache" pickles, or the JPEGs."""

  name = "mini_imagenet"
  SOURCE = ("miniImageNet_category_split_{train_phase_train,val,test}.pickle (MetaOptNet / "
            "original MetaDiff), mini-imagenet-cache-{train,validation,test}.pkl, or "
            "images/*.jpg with {train,val,test}.csv (Ravi & Larochelle)")

  def read_splits(self, dl_manager):
    return formats.read_mini_imagenet(self.manual_dir(), self.spec)


class TieredImagenet(FewShotBuilder, skip_registration=True):
  """tieredImageNet (Ren et al. 2018): 351/97/160 classes from 20/6/8 categories, 84x84, from
  Ren et al.'s PNG pickles or MetaOptNet's npz files."""

  name = "tiered_imagenet"
  SOURCE = ("{train,val,test}_images_png.pkl with {split}_labels.pkl (Ren et al.) or "
            "{split}_images.npz with {split}_labels.pkl (MetaOptNet)")

  def read_splits(self, dl_manager):
    return formats.read_tiered_imagenet(self.manual_dir(), self.spec)


class DownloadFailed(Exception):
  """Why a download failed, in a few words (the caller says what to do instead)."""


def _short_reason(e: BaseException) -> str:
  if isinstance(e, urllib.error.HTTPError):
    return f"HTTP {e.code} {e.reason}"
  if isinstance(e, urllib.error.URLError):
    e = e.reason if isinstance(e.reason, BaseException) else e
  text = " ".join(str(e).split())[:160]
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _open_url(url: str):
  """The response to GET `url`, once its headers arrived within DOWNLOAD_ANSWER_S.

  The request runs in a daemon thread because a socket timeout does not bound the name lookup
  (getaddrinfo), which alone can block for minutes where DNS is unreachable.
  """
  result = {}

  def request():
    try:
      result["response"] = urllib.request.urlopen(url, timeout=DOWNLOAD_STALL_S)  # noqa: S310
    except Exception as e:  # noqa: BLE001  (DNS, refused, TLS, HTTP status, proxy, ...)
      result["error"] = e

  thread = threading.Thread(target=request, name="download", daemon=True)
  thread.start()
  thread.join(DOWNLOAD_ANSWER_S)
  if thread.is_alive():
    raise DownloadFailed(f"no answer within {DOWNLOAD_ANSWER_S:g} s")
  if "error" in result:
    raise DownloadFailed(_short_reason(result["error"]))
  return result["response"]


def download_file(url: str, path: str, md5: str | None) -> str:
  """Downloads `url` to `path` once, in one bounded attempt, checking its md5.

  A finished download is renamed into place only after its md5 matched, so an existing `path`
  with the right md5 is reused without a network; a partial one never has the final name, and
  one with another md5 is replaced only by a download that succeeds.

  Args:
    url: an http(s) URL (proxies from the usual environment variables are honoured).
    path: where the file goes.
    md5: the md5 hex digest it must have; None skips the check.

  Returns:
    `path`.

  Raises:
    DownloadFailed: no answer within DOWNLOAD_ANSWER_S, a stall of DOWNLOAD_STALL_S, an HTTP
      error, or a wrong md5; nothing is left at `path`.
  """
  if os.path.isfile(path):
    if md5 is None or formats.file_md5(path) == md5.lower():
      return path
    logging.warning("%s does not have md5 %s; downloading it again", path, md5)
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  name = os.path.basename(path)
  response = _open_url(url)
  digest = hashlib.md5(usedforsecurity=False)
  fd, part = tempfile.mkstemp(prefix=f"{name}.", suffix=".part", dir=directory)
  try:
    with response, os.fdopen(fd, "wb") as f:
      total = int(response.headers.get("Content-Length") or 0)
      done, logged = 0, 0
      logging.info("downloading %s (%.0f MB) from %s", name, total / 1e6, url)
      while True:
        try:
          block = response.read(1 << 20)
        except Exception as e:  # noqa: BLE001  (socket timeout, reset, ...)
          raise DownloadFailed(
              f"stopped after {done / 1e6:.0f} MB ({_short_reason(e)})") from None
        if not block:
          break
        f.write(block)
        digest.update(block)
        done += len(block)
        if total and done * 10 // total > logged:
          logged = done * 10 // total
          logging.info("downloaded %d%% of %s", 10 * logged, name)
    if total and done != total:
      raise DownloadFailed(f"stopped after {done} of {total} bytes")
    if md5 is not None and digest.hexdigest() != md5.lower():
      raise DownloadFailed(f"the file has md5 {digest.hexdigest()}, not {md5}")
    os.replace(part, path)
  finally:
    if os.path.exists(part):
      os.remove(part)
  return path


class _Cifar(FewShotBuilder, skip_registration=True):
  """Shared: CIFAR-100 archive in the manual dir, fetched where a network exists, or pickles."""

  PICKLE_PREFIX = ""

  def __init__(self, *, archive_md5: str | None = formats.CIFAR100_MD5, **kwargs):
    self._archive_md5 = archive_md5
    super().__init__(**kwargs)

  def _archive(self, dl_manager) -> str | None:
    """The archive path: the manual dir's, else a download; None where pickles are used."""
    manual = self._manual
    if manual is not None:
      if not os.path.isdir(manual):
        self.manual_dir()  # raises the missing-directory error
      if os.path.exists(os.path.join(manual, "cifar-100-python.tar.gz")):
        return os.path.join(manual, "cifar-100-python.tar.gz")
      if any(os.path.exists(os.path.join(manual, f"{self.PICKLE_PREFIX}_{s}.pickle"))
             for s in SPLITS):
        return None
    archive, url, md5 = formats.CIFAR100_ARCHIVE, CIFAR100_URL, formats.CIFAR100_MD5
    pickles = f"{self.PICKLE_PREFIX}_{{train,val,test}}.pickle"
    try:
      return download_file(url, os.path.join(os.fspath(dl_manager.download_dir), archive),
                           self._archive_md5)
    except DownloadFailed as e:
      where = "DIR" if manual is None else manual
      found = "" if manual is None else f"{manual} holds neither {archive} nor {pickles}, and "
      raise DataError(
          f"{found}could not download {archive} (md5 {md5}) from {url} ({e}); fetch it "
          f"where a network exists and build with --manual_dir {where}, {where} holding "
          f"{archive} (or MetaOptNet's {pickles})") from None

  def read_splits(self, dl_manager):
    archive = self._archive(dl_manager)
    manual = self._manual if archive is None else os.path.dirname(archive)
    read = formats.read_cifar_fs if self.name == "cifar_fs" else formats.read_fc100
    return read(manual, self.spec, archive_md5=self._archive_md5, archive=archive)


class CifarFs(_Cifar, skip_registration=True):
  """CIFAR-FS (Bertinetto et al. 2019): 64/16/20 CIFAR-100 classes of 600 32x32 images."""

  name = "cifar_fs"
  PICKLE_PREFIX = "CIFAR_FS"
  SOURCE = ("cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html, downloaded "
            "where a network exists) or CIFAR_FS_{train,val,test}.pickle (MetaOptNet)")


class Fc100(_Cifar, skip_registration=True):
  """FC100 (Oreshkin et al. 2018): 60/20/20 CIFAR-100 classes from 12/4/4 superclasses."""

  name = "fc100"
  PICKLE_PREFIX = "FC100"
  SOURCE = ("cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html, downloaded "
            "where a network exists) or FC100_{train,val,test}.pickle (MetaOptNet)")


@dataclasses.dataclass
class ImageFolderConfig(tfds.core.BuilderConfig):
  """A user's dataset: its name (the config name), image size (H, W) and channels."""

  image_size: tuple[int, int] = (84, 84)
  channels: int = 3


class ImageFolder(FewShotBuilder, skip_registration=True):
  """A user's own images: root/{train,val,test}/<class>/<image files>, resized."""

  name = "image_folder"
  SOURCE = "root/{train,val,test}/<class name>/<image files> (your own images)"
  CONFIG_CLASS = ImageFolderConfig

  def image_shape(self):
    return (*self.builder_config.image_size, self.builder_config.channels)

  def source_state(self) -> dict:
    """What the build is made from: the fingerprint of the files and the requested shape."""
    cfg = self.builder_config
    return {"root": os.path.abspath(self.manual_dir()),
            "image_size": [int(d) for d in cfg.image_size], "channels": int(cfg.channels),
            **image_folder_fingerprint(self.manual_dir())}

  def read_splits(self, dl_manager):
    # Taken before the files are read: a file changed during the build makes the next build
    # see a difference rather than miss one.
    self.info.metadata["source"] = self.source_state()
    return formats.read_image_folder(self.manual_dir(), tuple(self.builder_config.image_size),
                                     self.builder_config.channels)


def image_folder_fingerprint(root: formats.PathLike) -> dict:
  """A fingerprint of the files that `formats.read_image_folder(root)` reads.

  Args:
    root: the folder holding train/, val/ and test/.

  Returns:
    {"sha256": hex of every (split/class/file, size, mtime in ns), "files": {split: count},
    "classes": {split: count}}; a missing folder counts as empty (reading it says what is
    wrong).
  """
  root = pathlib.Path(root)
  entries, files, classes = [], {}, {}
  for split in SPLITS:
    split_dir = root / split
    names = formats.image_folder.class_folders(split_dir) if split_dir.is_dir() else []
    classes[split], files[split] = len(names), 0
    for name in names:
      for file in formats.image_folder.image_files(split_dir / name):
        st = (split_dir / name / file).stat()
        entries.append((f"{split}/{name}/{file}", st.st_size, st.st_mtime_ns))
        files[split] += 1
  digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
  return {"sha256": digest, "files": files, "classes": classes}


def _source_change(stored: dict | None, current: dict) -> str | None:
  """Why a build made from `stored` is not one of `current` (None: it is)."""
  if not stored:
    return "it was built before its source files were fingerprinted"
  why = []
  if stored.get("image_size") != current["image_size"]:
    why.append("image size {} -> {}".format(*("x".join(map(str, s)) for s in (
        stored.get("image_size") or ["?"], current["image_size"]))))
  if stored.get("channels") != current["channels"]:
    why.append(f"channels {stored.get('channels')} -> {current['channels']}")
  for split in SPLITS:
    then = (stored.get("classes", {}).get(split), stored.get("files", {}).get(split))
    now = (current["classes"][split], current["files"][split])
    if then != now:
      why.append(f"{split} {then[0]} classes / {then[1]} images -> {now[0]} / {now[1]}")
  if not why and stored.get("sha256") != current["sha256"]:
    why.append("file names, sizes or modification times changed")
  if not why:
    return None
  moved = "" if stored.get("root") == current["root"] else (
      f" (built from {stored.get('root')}, now {current['root']})")
  return "; ".join(why) + moved


@dataclasses.dataclass
class EmbeddedConfig(tfds.core.BuilderConfig):
  """Generation settings of an embedded set (`embedded.Recipe.generate`).

  Attributes:
    num_classes: None for the set's default (glyphs 640, textures 600).
    images_per_class: images of each class.
    image_size: side of each square image, px.
    seed: draws the classes, their splits and every image.
  """

  num_classes: int | None = None
  images_per_class: int = 20
  image_size: int = 32
  seed: int = 0


class EmbeddedBuilder(FewShotBuilder, skip_registration=True):
  """Base of the embedded sets: generates the set of `RECIPE`, then cuts it into its splits.

  The build's metadata holds the set's digest under "<name>_fingerprint" (`embedded.fingerprint`).
  """

  RECIPE: embedded.Recipe
  CONFIG_CLASS = EmbeddedConfig

  def image_shape(self):
    size = self.builder_config.image_size
    return (size, size, self.RECIPE.channels)

  def read_splits(self, dl_manager):
    cfg = self.builder_config
    data = self.RECIPE.generate(num_classes=cfg.num_classes,
                                images_per_class=cfg.images_per_class,
                                image_size=cfg.image_size, seed=cfg.seed, progress=True)
    digest = embedded.fingerprint(data)
    logging.info("%s fingerprint %s", self.name, digest)
    self.info.metadata[f"{self.name}_fingerprint"] = digest
    return _generated_splits(data)


class Glyphs(EmbeddedBuilder, skip_registration=True):
  """The embedded default: glyphs of many scripts rendered from matplotlib's fonts.

  A synthetic stand-in in the spirit of Omniglot (see docs/GLYPHS.md), not a benchmark from the
  literature; it needs no download.
  """

  name = "glyphs"
  SOURCE = "generated from the fonts bundled with matplotlib (no download)"
  RECIPE = glyphs.RECIPE


class Textures(EmbeddedBuilder, skip_registration=True):
  """The second embedded set: procedurally generated RGB texture classes.

  Synthetic and harder than the glyphs (see docs/TEXTURES.md), not a benchmark from the
  literature; it needs no download.
  """

  name = "textures"
  SOURCE = "generated procedurally (no download)"
  RECIPE = textures.RECIPE


def _generated_splits(data: embedded.EmbeddedSet) -> dict[str, formats.RawSplit]:
  """An embedded set cut into its class splits, with within-split labels in the order of the
  global class indices."""
  raw = {}
  for split in SPLITS:
    classes = np.asarray(data.splits[split])
    relabel = np.full(len(data.class_names), -1, np.int64)
    relabel[classes] = np.arange(len(classes))
    keep = np.flatnonzero(relabel[data.labels] >= 0)
    raw[split] = formats.RawSplit(
        images=data.images[keep], labels=relabel[data.labels[keep]],
        class_names=tuple(data.class_names[c] for c in classes))
  return raw


BUILDERS: dict[str, type[FewShotBuilder]] = {
    b.name: b for b in (Glyphs, Textures, MiniImagenet, TieredImagenet, CifarFs, Fc100,
                        ImageFolder)
}


def make_builder(name: str, data_dir: str, manual_dir: str | None = None,
                 config: tfds.core.BuilderConfig | str | None = None, **kwargs) -> FewShotBuilder:
  """The builder of dataset `name` writing under `data_dir`.

  Args:
    name: one of `BUILDERS`.
    data_dir: the TFDS data directory.
    manual_dir: the directory with the user's files (not needed for glyphs and textures).
    config: a builder config (glyphs, textures, image_folder) or its name.
    **kwargs: `spec=`, `archive_md5=` (CIFAR) and other builder arguments.

  Returns:
    The builder; call `build(builder)` to write the dataset.
  """
  if name not in BUILDERS:
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
  config_class = BUILDERS[name].CONFIG_CLASS
  if config_class is not None:
    if config is None or isinstance(config, str):
      config = config_class(name=config or "default")
    kwargs["config"] = config
  elif config is not None:
    raise DataError(f"{name} has no builder configs; leave out --config")
  return BUILDERS[name](data_dir=data_dir, manual_dir=manual_dir, **kwargs)


def build(builder: FewShotBuilder, report: Callable[[str], None] | None = None) -> str:
  """Writes the dataset; returns its directory.

  A complete build is kept as it is, except an image folder's whose source files (or requested
  image size or channels) changed since: that one is rebuilt beside the old build, which is
  replaced only once the new one is complete, so a failed rebuild loses nothing.

  Args:
    builder: from `make_builder`.
    report: called with one line where an existing build is kept (the line starts with
      "kept") or rebuilt (with "rebuilding"), saying why.
  """
  report = report or (lambda line: logging.info("%s", line))
  path = os.fspath(builder.data_path)
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    if not hasattr(builder, "source_state"):  # generated, or files of a fixed benchmark
      report(f"kept the existing build {path}")
      return path
    if builder._manual is None:  # noqa: SLF001  (nothing to compare with)
      report(f"kept the existing build {path} (give --manual_dir to check its source files "
             "for changes)")
      return path
    stored = _stored_metadata(path).get("source")
    change = _source_change(stored, builder.source_state())
    if change is None:
      report(f"kept the existing build {path}: its source files are unchanged")
      return path
    report(f"rebuilding {path}: {change}")
    _rebuild(builder)
    return path
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=builder._manual))  # noqa: SLF001
  return path


def _stored_metadata(path: str) -> dict:
  try:
    with open(os.path.join(path, "metadata.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _rebuild(builder: FewShotBuilder) -> None:
  """Builds `builder`'s dataset again in a hidden sibling folder, then swaps it in."""
  path = os.fspath(builder.data_path)
  parent, version = os.path.split(path)
  # Hidden names are not versions, so `load.dataset_dir` never opens a half-made build.
  scratch = tempfile.mkdtemp(prefix=".rebuild-", dir=parent)
  try:
    fresh = type(builder)(data_dir=scratch, manual_dir=builder._manual,  # noqa: SLF001
                          spec=builder._spec, config=builder.builder_config)  # noqa: SLF001
    fresh.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=builder._manual))  # noqa: SLF001
    replaced = os.path.join(scratch, f".{version}.replaced")
    os.rename(path, replaced)
    try:
      os.rename(os.fspath(fresh.data_path), path)
    except OSError:
      os.rename(replaced, path)
      raise
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
