"""Opening built datasets: random-access data sources and whole splits as arrays.

What `builders.py` wrote is opened by path with `tfds.builder_from_directory(...)
.as_data_source()`, which reads array_record files without TensorFlow. A split small enough for
memory (every benchmark split but tieredImageNet's train split, 9.5 GB) is read once into a
`SplitArrays`; the episode sampler and the feature cache take it from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from metadiff_jax import metrics
from metadiff_jax.data.errors import DataError

DEFAULT_DATA_DIR = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class DatasetRef:
  """Where a built dataset lives: name, builder config (None = the only one), data_dir."""

  name: str
  data_dir: str = DEFAULT_DATA_DIR
  config: str | None = None

  def build_command(self) -> str:
    cmd = f"python -m metadiff_jax.data build {self.name} --data_dir {self.data_dir}"
    if self.name not in ("glyphs", "textures", "cifar_fs", "fc100"):
      cmd += " --manual_dir <dir with its files>"
    if self.config not in (None, "default"):
      cmd += f" --config {self.config}"
    return cmd


@dataclasses.dataclass(frozen=True)
class SplitArrays:
  """A whole split in host memory.

  Attributes:
    images: [n, H, W, C] uint8.
    labels: [n] int32 within-split class indices in [0, C).
    class_names: the C class names, in label order.
    fingerprint: short hex identifying the built dataset (name, config, version, split
      sizes and content hashes); the feature cache is keyed on it.
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  fingerprint: str

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def dataset_dir(ref: DatasetRef) -> str:
  """The directory of the newest built version of `ref`, or a DataError saying how to build it."""
  root = os.path.join(os.path.expanduser(ref.data_dir), ref.name)
  if ref.config is not None:
    root = os.path.join(root, ref.config)
  elif os.path.isdir(os.path.join(root, "default")):
    root = os.path.join(root, "default")
  versions = []
  if os.path.isdir(root):
    for v in os.listdir(root):
      if os.path.exists(os.path.join(root, v, "dataset_info.json")):
        try:
          versions.append((tuple(int(x) for x in v.split(".")), v))
        except ValueError:
          continue
  if not versions:
    raise DataError(f"dataset {ref.name} is not built in {ref.data_dir}; build it with: "
                    f"{ref.build_command()}")
  return os.path.join(root, max(versions)[1])


def open_source(ref: DatasetRef, split: str, decode: bool = True):
  """A random-access source of split `split`: len(), source[i] and source.__getitems__(idx).

  Args:
    ref: the built dataset.
    split: "train", "val" or "test".
    decode: records as {"image": uint8 [H, W, C], "label": int}; False gives each record as the
      bytes of its serialized `tf.train.Example`.
  """
  path = dataset_dir(ref)
  method = tfds.decode.DeserializeMethod
  try:
    builder = tfds.builder_from_directory(path)
    sources = builder.as_data_source(
        deserialize_method=method.DESERIALIZE_AND_DECODE if decode else method.RAW_BYTES)
  except Exception as e:  # noqa: BLE001  (a damaged build: say how to rebuild)
    raise DataError(f"cannot open the built dataset in {path} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); delete that directory and "
                    f"rebuild with: {ref.build_command()}") from None
  if split not in sources:
    raise DataError(f"{ref.name} has no split {split!r}; it has {sorted(sources)}")
  return sources[split]


def class_names(ref: DatasetRef, split: str) -> tuple[str, ...]:
  """The class names of a split, in label order, from the dataset's metadata."""
  with open(os.path.join(dataset_dir(ref), "metadata.json")) as f:
    return tuple(json.load(f)["class_names"][split])


def image_shape(ref: DatasetRef) -> tuple[int, int, int]:
  """(H, W, C) of the built dataset's images, from its features.json (no records read)."""
  path = os.path.join(dataset_dir(ref), "features.json")
  try:
    with open(path) as f:
      image = json.load(f)["featuresDict"]["features"]["image"]["tensor"]
    return tuple(int(d) for d in image["shape"]["dimensions"])
  except (OSError, ValueError, KeyError, TypeError):
    raise DataError(f"cannot read the image shape from {path}; the build is damaged; delete "
                    f"it and rebuild with: {ref.build_command()}") from None


def normalization(ref: DatasetRef) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The per-channel (mean, std) of the train split's pixels in [0, 1], stored by the build.

  Raises:
    DataError: the dataset is not built, or was built before the statistics were stored.
  """
  path = dataset_dir(ref)
  try:
    with open(os.path.join(path, "metadata.json")) as f:
      stats = json.load(f).get("normalization")
  except (OSError, ValueError):
    stats = None
  if not stats:
    raise DataError(f"the build in {path} has no stored normalisation statistics (it predates "
                    f"them); build it again with: {ref.build_command()} (an image folder is "
                    "rebuilt in place), or set config.data.augment.mean and .std")
  return tuple(float(m) for m in stats["mean"]), tuple(float(s) for s in stats["std"])


def fingerprint(ref: DatasetRef) -> str:
  """A short hex naming the built dataset: name, config, version, split sizes and content.

  The content is the sha256 of every image and label that the builder wrote, per split.
  """
  path = dataset_dir(ref)
  with open(os.path.join(path, "dataset_info.json")) as f:
    info = json.load(f)
  metadata_path = os.path.join(path, "metadata.json")
  content = None
  if os.path.exists(metadata_path):
    with open(metadata_path) as f:
      content = json.load(f).get("content_sha256")
  key = {
      "name": ref.name, "config": info.get("configName"), "version": info.get("version"),
      "splits": sorted((s["name"], s.get("shardLengths"), s.get("numBytes"))
                       for s in info.get("splits", [])),
      "content": content,
  }
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def split_labels(ref: DatasetRef, split: str, batch_size: int = 4096) -> np.ndarray:
  """The labels of a split, in record order, read without decoding its images.

  Each record's `tf.train.Example` is parsed and only its label kept: about twice as fast as
  `load_split` and without holding the images.

  Args:
    ref: the built dataset.
    split: "train", "val" or "test".
    batch_size: records read per call.

  Returns:
    [n] int32 within-split class indices in [0, C), as `load_split(ref, split).labels`.
  """
  source = open_source(ref, split, decode=False)
  labels = np.empty((len(source),), np.int32)
  for i, record in _records(source, batch_size):
    example = tf_example_pb2.Example.FromString(record)
    labels[i] = example.features.feature["label"].int64_list.value[0]
  _check_labels(ref, split, labels, len(class_names(ref, split)))
  return labels


def _records(source, batch_size: int, progress=None):
  """(index, record) of every record of `source`, read `batch_size` at a time; `progress` (a
  `metrics.Progress`) is advanced after each batch."""
  for start in range(0, len(source), batch_size):
    idx = list(range(start, min(len(source), start + batch_size)))
    yield from zip(idx, source.__getitems__(idx))
    if progress is not None:
      progress.update(len(idx))


def _check_labels(ref: DatasetRef, split: str, labels: np.ndarray, num_classes: int) -> None:
  """Raises a DataError saying how to rebuild where a label is outside [0, num_classes)."""
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f"{dataset_dir(ref)}: labels of {split} outside [0, {num_classes}); the "
                    f"build is damaged; delete it and rebuild with: {ref.build_command()}")


def load_split(ref: DatasetRef, split: str, batch_size: int = 1024,
               progress: bool = True) -> SplitArrays:
  """Reads a whole split into memory.

  Args:
    ref: the built dataset.
    split: "train", "val" or "test".
    batch_size: records read per call.
    progress: show a progress bar.

  Returns:
    The split's images, labels, class names and dataset fingerprint.
  """
  source = open_source(ref, split)
  n = len(source)
  first = source[0]
  images = np.empty((n, *first["image"].shape), np.uint8)
  labels = np.empty((n,), np.int32)
  bar = metrics.Progress(n, f"reading {ref.name}/{split}", unit="img", enabled=progress)
  for i, record in _records(source, batch_size, bar):
    images[i] = record["image"]
    labels[i] = record["label"]
  bar.close()
  names = class_names(ref, split)
  _check_labels(ref, split, labels, len(names))
  return SplitArrays(images, labels, names, fingerprint(ref))

