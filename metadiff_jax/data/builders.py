"""TFDS builders that write the few-shot datasets as array_record files, with no TensorFlow.

Each builder reads a user's files with `formats.py` (or generates the glyphs or the textures),
and writes splits
`train` / `val` / `test` of examples `{"image": uint8 [H, W, C], "label": int64}`. Labels are
within-split class indices 0..C-1; the class names of each split are stored in the dataset's
metadata (`metadata.json`, key "class_names"). Images are `tfds.features.Tensor` rather than
`tfds.features.Image`, because encoding an Image feature needs TensorFlow; array_record files
are then read by `tfds.data_source` with TensorFlow absent (`load.py`).

Records keep their generation order (`disable_shuffling`): record i of a split is image i of
the source in the order the source lists them, so a built split is a pure function of its
source files.

The builders are not put in TFDS's global registry (the name `image_folder` is TFDS's own);
`load.py` opens what they write by path, and `BUILDERS` maps our dataset names to them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from metadiff_jax.data import formats, glyphs, spec as spec_lib, textures
from metadiff_jax.data.errors import DataError

SPLITS = spec_lib.SPLITS
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


class FewShotBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: turns `read_splits()` -> {split: RawSplit} into array_record splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # Where the files come from, shown by `python -m metadiff_jax.data build --help` and errors.
  SOURCE = ""

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
    for i in range(len(labels)):
      image = np.asarray(data.images[i])
      if image.shape != shape or image.dtype != np.uint8:
        raise DataError(f"{self.name}/{split} image {i}: shape {image.shape} dtype {image.dtype},"
                        f" expected {shape} uint8")
      content.update(np.ascontiguousarray(image).tobytes())
      content.update(labels[i].tobytes())
      yield i, {"image": image, "label": labels[i]}
    self.info.metadata.setdefault("content_sha256", {})[split] = content.hexdigest()


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
    try:
      return os.fspath(dl_manager.download(CIFAR100_URL))
    except Exception as e:  # noqa: BLE001  (no network, proxy, ...: say what to do instead)
      raise DataError(
          f"could not download {CIFAR100_URL} ({type(e).__name__}); download it yourself and "
          f"pass its directory as --manual_dir, or put {self.PICKLE_PREFIX}_{{train,val,test}}"
          ".pickle (MetaOptNet) there") from None

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

  def image_shape(self):
    return (*self.builder_config.image_size, self.builder_config.channels)

  def read_splits(self, dl_manager):
    return formats.read_image_folder(self.manual_dir(), tuple(self.builder_config.image_size),
                                     self.builder_config.channels)


@dataclasses.dataclass
class GlyphsConfig(tfds.core.BuilderConfig):
  """Glyph generation settings (`glyphs.generate`)."""

  num_classes: int = glyphs.DEFAULT_NUM_CLASSES
  images_per_class: int = 20
  image_size: int = 32
  seed: int = 0


class Glyphs(FewShotBuilder, skip_registration=True):
  """The embedded default: glyphs of many scripts rendered from matplotlib's fonts.

  A synthetic stand-in in the spirit of Omniglot (see docs/GLYPHS.md), not a benchmark from the
  literature; it needs no download.
  """

  name = "glyphs"
  SOURCE = "generated from the fonts bundled with matplotlib (no download)"

  def image_shape(self):
    size = self.builder_config.image_size
    return (size, size, 1)

  def read_splits(self, dl_manager):
    cfg = self.builder_config
    data = glyphs.generate(num_classes=cfg.num_classes, images_per_class=cfg.images_per_class,
                           image_size=cfg.image_size, seed=cfg.seed, progress=True)
    logging.info("glyphs fingerprint %s", glyphs.fingerprint(data))
    self.info.metadata["glyphs_fingerprint"] = glyphs.fingerprint(data)
    return _generated_splits(data)


def _generated_splits(data) -> dict[str, formats.RawSplit]:
  """A generated set (glyphs.GlyphSet, textures.TextureSet) cut into its class splits, with
  within-split labels in the order of the global class indices."""
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


@dataclasses.dataclass
class TexturesConfig(tfds.core.BuilderConfig):
  """Texture generation settings (`textures.generate`)."""

  num_classes: int = textures.DEFAULT_NUM_CLASSES
  images_per_class: int = 20
  image_size: int = 32
  seed: int = 0


class Textures(FewShotBuilder, skip_registration=True):
  """The second embedded set: procedurally generated RGB texture classes.

  Synthetic and harder than the glyphs (see docs/TEXTURES.md), not a benchmark from the
  literature; it needs no download.
  """

  name = "textures"
  SOURCE = "generated procedurally (no download)"

  def image_shape(self):
    size = self.builder_config.image_size
    return (size, size, 3)

  def read_splits(self, dl_manager):
    cfg = self.builder_config
    data = textures.generate(num_classes=cfg.num_classes, images_per_class=cfg.images_per_class,
                             image_size=cfg.image_size, seed=cfg.seed, progress=True)
    logging.info("textures fingerprint %s", textures.fingerprint(data))
    self.info.metadata["textures_fingerprint"] = textures.fingerprint(data)
    return _generated_splits(data)


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
  config_class = {"glyphs": GlyphsConfig, "textures": TexturesConfig,
                  "image_folder": ImageFolderConfig}.get(name)
  if config_class is not None:
    # These configs are made per call (no class-level list), so a custom size can be named.
    if config is None or isinstance(config, str):
      config = config_class(name=config or "default")
    kwargs["config"] = config
  elif config is not None:
    raise DataError(f"{name} has no builder configs; leave out --config")
  return BUILDERS[name](data_dir=data_dir, manual_dir=manual_dir, **kwargs)


def build(builder: FewShotBuilder) -> str:
  """Writes the dataset (a no-op where it is already complete); returns its directory."""
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=builder._manual))  # noqa: SLF001
  return os.fspath(builder.data_path)
