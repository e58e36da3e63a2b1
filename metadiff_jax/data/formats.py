"""Readers for the on-disk formats in which the few-shot benchmarks circulate.

Each `read_<dataset>(manual_dir, spec)` finds which known layout `manual_dir` holds, reads it,
validates it against `spec` (class sets, images per class, image shape and dtype, disjoint
splits), and returns one `RawSplit` per split. Nothing here knows about TFDS; the builders in
`builders.py` turn RawSplits into array_record files.

Images keep the order of the source files (a pickle's array order, a CSV's row order, sorted
folder and file names); only the labels are renumbered to 0..C-1 within each split.

Pickles are only ever read from the paths that the user's `manual_dir` names (or the CIFAR-100
archive the caller passes), with an unpickler that only builds the plain containers and numpy
arrays these formats hold. Every failure is a `DataError` whose one line names the file, the
expected layout and where such files come from.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import logging
import os
import pathlib
import pickle
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from metadiff_jax.data.errors import DataError
from metadiff_jax.data.spec import (SPLITS, DatasetSpec, cifar100_fine_names, fc100_classes,
                                    mini_imagenet_filenames)

logger = logging.getLogger(__name__)

CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
# Suffixes `read_image_folder` takes as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

PathLike = str | os.PathLike


class LazyImages(Sequence):
  """Images decoded on demand: `items[i]` is raw (bytes, a path, ...), `decode(item)` -> HWC uint8."""

  def __init__(self, items: Sequence[Any], decode: Callable[[Any], np.ndarray]):
    self._items = items
    self._decode = decode

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return LazyImages(self._items[i], self._decode)
    return self._decode(self._items[i])


@dataclasses.dataclass
class RawSplit:
  """One split as read from a user's files, before it is written as array_record.

  Attributes:
    images: [n] sequence of uint8 [H, W, C] arrays (an np.ndarray [n, H, W, C] or `LazyImages`).
    labels: [n] int64 in [0, C): label i is class_names[i].
    class_names: the C class identifiers (wnids, CIFAR names, or "class_<id>" where the source
      has none), in label order.
  """

  images: Sequence[np.ndarray]
  labels: np.ndarray
  class_names: tuple[str, ...]


# --- layouts ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
  """One on-disk layout of a dataset.

  Attributes:
    name: what `detect_layout` returns.
    files: the paths (relative to manual_dir) the layout needs.
    markers: paths whose presence alone says the user meant this layout (then a missing file
      of `files` is reported by name rather than as "no known layout").
    expected: what the files hold, for messages.
    source: where such files are usually obtained, for messages.
  """

  name: str
  files: tuple[str, ...]
  markers: tuple[str, ...]
  expected: str
  source: str


_GIDARIS_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
# The cache pickles call the validation split "validation".
_CACHE_FILES = {s: f"mini-imagenet-cache-{'validation' if s == 'val' else s}.pkl" for s in SPLITS}

_METAOPTNET = "the MetaOptNet repository's Google Drive link (kjunelee/MetaOptNet README)"


def _cifar_pickles_layout(prefix: str, drive_id: str) -> _Layout:
  files = tuple(f"{prefix}_{s}.pickle" for s in SPLITS)
  return _Layout(
      "metaoptnet_pickles", files, files,
      f"{prefix}_{{train,val,test}}.pickle, each a pickled dict with 'data' uint8 [n, 32, 32, 3] "
      "and 'labels' (n ints)",
      f"{_METAOPTNET} for {prefix.replace('_', '-')} (id {drive_id})")


_CIFAR_ARCHIVE_LAYOUT = _Layout(
    "cifar100_archive", (CIFAR100_ARCHIVE,), (CIFAR100_ARCHIVE,),
    f"{CIFAR100_ARCHIVE} (md5 {CIFAR100_MD5}) holding cifar-100-python/{{train,test,meta}}",
    CIFAR100_URL)

_LAYOUTS: dict[str, tuple[_Layout, ...]] = {
    "mini_imagenet": (
        _Layout("gidaris_pickles", tuple(_GIDARIS_FILES.values()), tuple(_GIDARIS_FILES.values()),
                "miniImageNet_category_split_{train_phase_train,val,test}.pickle, each a pickled "
                "dict with 'data' uint8 [n, 84, 84, 3], 'labels' (n ints) and optionally "
                "'catname2label' {wnid: label}",
                f"{_METAOPTNET} for miniImageNet (Gidaris & Komodakis' pickles, also read by the "
                "original MetaDiff)"),
        _Layout("cache_pickles", tuple(_CACHE_FILES.values()), tuple(_CACHE_FILES.values()),
                "mini-imagenet-cache-{train,validation,test}.pkl, each a pickled dict with "
                "'image_data' uint8 [n, 84, 84, 3] and 'class_dict' {wnid: [image indices]}",
                "the mini-imagenet-cache pickles that learn2learn's MiniImagenet downloads"),
        _Layout("jpeg", ("images",), ("images",),
                "images/<wnid><8 digits>.jpg (600 per class) and optionally the Ravi & "
                "Larochelle {train,val,test}.csv (header filename,label; the packaged copies are "
                "used when absent)",
                "a miniImageNet JPEG release made from ILSVRC-2012 train images with the Ravi & "
                "Larochelle CSVs (e.g. by yaoyao-liu/mini-imagenet-tools)"),
    ),
    "tiered_imagenet": (
        _Layout("ren_png_pickles",
                tuple(f"{s}_{k}.pkl" for s in SPLITS for k in ("images_png", "labels")),
                tuple(f"{s}_images_png.pkl" for s in SPLITS),
                "{train,val,test}_images_png.pkl (a pickled list of PNG-encoded 84x84 images, "
                "each bytes or a uint8 array of shape (n,) or (n, 1)) and "
                "{train,val,test}_labels.pkl (a dict with 'label_specific' and "
                "'label_specific_str'), optionally synsets.txt and class_names.txt",
                "the tiered-imagenet tar linked from renmengye/few-shot-ssl-public's README "
                "(Google Drive id 1g1aIDy2Ar_MViF2gDXFYDBTR-HYecV07)"),
        _Layout("metaoptnet_npz",
                tuple(f"{s}_{k}" for s in SPLITS for k in ("images.npz", "labels.pkl")),
                tuple(f"{s}_images.npz" for s in SPLITS),
                "{train,val,test}_images.npz (key 'images', uint8 [n, 84, 84, 3], BGR) and "
                "{train,val,test}_labels.pkl (a dict with 'labels', n ints)",
                f"{_METAOPTNET} for tieredImageNet (id 1nVGCTd9ttULRXFezh4xILQ9lUkg0WZCG)"),
    ),
    "cifar_fs": (_CIFAR_ARCHIVE_LAYOUT,
                 _cifar_pickles_layout("CIFAR_FS", "1GjGMI0q3bgcpcB_CjI40fX54WgLPuTpS")),
    "fc100": (_CIFAR_ARCHIVE_LAYOUT,
              _cifar_pickles_layout("FC100", "1_ZsLyqI487NRDQhwvI7rg86FK3YAZvz1")),
}

_IMAGE_FOLDER_EXPECTED = ("root/{train,val,test}/<class name>/<image files> (.jpg .jpeg .png "
                          ".bmp .gif .webp), at least 2 classes per split, no class in two splits")
_IMAGE_FOLDER_SOURCE = "your own images, arranged by split and class"


def _layout(dataset: str, name: str) -> _Layout:
  return next(l for l in _LAYOUTS[dataset] if l.name == name)


def _describe_layouts(dataset: str) -> str:
  return " | ".join(f"{l.name}: {l.expected} (from {l.source})" for l in _LAYOUTS[dataset])


def detect_layout(dataset: str, manual_dir: PathLike) -> str:
  """Which known layout `manual_dir` holds for `dataset`.

  A layout whose files are all present wins, in the order of preference (miniImageNet:
  gidaris_pickles, cache_pickles, jpeg; tieredImageNet: ren_png_pickles, metaoptnet_npz; CIFAR-FS
  and FC100: cifar100_archive, metaoptnet_pickles). Otherwise the first layout with some of its
  distinctive files is returned, so that its reader names the missing file.

  Args:
    dataset: "mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100" or "image_folder".
    manual_dir: the directory holding the user's files.

  Returns:
    The layout's name: "gidaris_pickles", "cache_pickles", "jpeg", "ren_png_pickles",
    "metaoptnet_npz", "cifar100_archive", "metaoptnet_pickles" or "image_folder".

  Raises:
    DataError: the directory is missing or holds no known layout; the message lists them all.
  """
  root = pathlib.Path(manual_dir)
  if dataset == "image_folder":
    if not all((root / s).is_dir() for s in SPLITS):
      raise DataError(f"{root}: not an image folder; expected {_IMAGE_FOLDER_EXPECTED}")
    return "image_folder"
  if dataset not in _LAYOUTS:
    raise DataError(f"no readers for dataset {dataset!r}; known: {', '.join(_LAYOUTS)}, "
                    "image_folder")
  if not root.is_dir():
    raise DataError(f"{root}: no such directory; expected one of the {dataset} layouts: "
                    f"{_describe_layouts(dataset)}")
  for layout in _LAYOUTS[dataset]:
    if all((root / f).exists() for f in layout.files):
      return layout.name
  for layout in _LAYOUTS[dataset]:
    if any((root / f).exists() for f in layout.markers):
      return layout.name
  raise DataError(f"{root}: no known {dataset} layout found; expected one of: "
                  f"{_describe_layouts(dataset)}")


# --- errors, pickles, validation --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Where:
  """The file being read, with what it should hold and where it comes from (for messages)."""

  path: str
  expected: str
  source: str

  def error(self, problem: str) -> DataError:
    return DataError(f"{self.path}: {problem}; expected {self.expected}; such files come from "
                     f"{self.source}")

  def at(self, path: PathLike) -> _Where:
    return dataclasses.replace(self, path=os.fspath(path))


def _where(path: PathLike, layout: _Layout) -> _Where:
  return _Where(os.fspath(path), layout.expected, layout.source)


def _short(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


# The globals the pickles of these formats need: numpy arrays and scalars (under numpy 1 and
# numpy 2 module names), Python 3's protocol-2 bytes trick, and plain containers. Anything else
# is refused, so a hostile pickle cannot run code.
_BUILTIN_NAMES = ("set", "frozenset", "list", "dict", "tuple", "bytearray", "bytes", "int",
                  "float", "complex", "str", "object", "slice", "range")
_PICKLE_GLOBALS = frozenset(
    {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
     for n in ("_reconstruct", "scalar")}
    | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
       ("collections", "OrderedDict"), ("collections", "defaultdict"),
       ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")}
    | {(m, n) for m in ("builtins", "__builtin__") for n in _BUILTIN_NAMES})


class _SafeUnpickler(pickle.Unpickler):
  """An unpickler that builds only `_PICKLE_GLOBALS`."""

  def find_class(self, module: str, name: str):
    if (module, name) not in _PICKLE_GLOBALS:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}, which these datasets "
                                   "never hold")
    # Old pickles name numpy 1's modules; numpy 2 keeps them only as deprecated aliases.
    if module.startswith("numpy.core.") and hasattr(np, "_core"):
      module = "numpy._core." + module[len("numpy.core."):]
    return super().find_class(module, name)


def _unpickle(f: io.BufferedIOBase, where: _Where, encodings: Sequence[str]) -> Any:
  """Unpickles `f`, trying each of `encodings` in turn (for Python 2 pickles)."""
  last: BaseException | None = None
  for encoding in encodings:
    try:
      f.seek(0)
      return _SafeUnpickler(f, encoding=encoding).load()
    except Exception as e:  # noqa: BLE001  (corrupt pickles raise almost anything)
      last = e
  raise where.error(f"cannot be unpickled ({_short(last)}); the file is truncated, corrupt or "
                    "not in this format")


def _load_pickle(path: pathlib.Path, where: _Where, encodings: Sequence[str]) -> Any:
  if not path.is_file():
    raise where.error("missing")
  try:
    with open(path, "rb") as f:
      return _unpickle(f, where, encodings)
  except OSError as e:
    raise where.error(f"cannot be read ({_short(e)})") from None


# Python 2 pickles: plain load first (Python 3 pickles), then latin1 (numpy data as py2 str).
_PY2 = ("ASCII", "latin1")


def _to_str(x: Any) -> Any:
  """Bytes (from Python 2 pickles loaded with encoding="bytes") as str; anything else as is."""
  if isinstance(x, (bytes, bytearray)):
    try:
      return bytes(x).decode("utf-8")
    except UnicodeDecodeError:
      return bytes(x).decode("latin1")
  return x


def _dict(obj: Any, where: _Where, keys: Iterable[str]) -> dict[str, Any]:
  """`obj` as a dict with str keys, checked to hold `keys`."""
  if not isinstance(obj, Mapping):
    raise where.error(f"holds a pickled {type(obj).__name__}, not a dict")
  out = {_to_str(k): v for k, v in obj.items()}
  missing = [k for k in keys if k not in out]
  if missing:
    raise where.error(f"has no key {missing[0]!r} (its keys: "
                      f"{', '.join(sorted(map(str, out))[:8])})")
  return out


def _int_labels(values: Any, where: _Where, what: str = "labels") -> np.ndarray:
  """Labels as int64 [n], refusing non-integer or non-finite values."""
  try:
    arr = np.asarray(values)
  except Exception as e:  # noqa: BLE001
    raise where.error(f"{what} are not an array of integers ({_short(e)})") from None
  if arr.ndim != 1:
    raise where.error(f"{what} have shape {arr.shape}, not [n]")
  if arr.dtype.kind in "iu":
    return arr.astype(np.int64)
  if arr.dtype.kind == "f":
    if not np.all(np.isfinite(arr)):
      raise where.error(f"{what} hold non-finite values")
    if np.all(arr == np.round(arr)):
      return arr.astype(np.int64)
  raise where.error(f"{what} must be integers, got {arr.dtype} values such as "
                    f"{arr[:3].tolist()}")


def _uint8_images(images: Any, where: _Where, shape: tuple[int, ...] | None) -> np.ndarray:
  """Images as uint8 [n, H, W, C], checked against `shape` (H, W, C) where given."""
  arr = images if isinstance(images, np.ndarray) else np.asarray(images)
  want = "[n, H, W, C]" if shape is None else f"[n, {', '.join(map(str, shape))}]"
  if arr.ndim != 4 or (shape is not None and tuple(arr.shape[1:]) != tuple(shape)):
    raise where.error(f"images have shape {list(arr.shape)}, not {want}")
  if arr.dtype == np.uint8:
    return arr
  if arr.dtype.kind in "iu":
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if 0 <= lo and hi <= 255:
      return arr.astype(np.uint8)
    raise where.error(f"images are {arr.dtype} with values {lo}..{hi}, which do not fit uint8")
  raise where.error(f"images are {arr.dtype}, not uint8")


def _finish(images: Sequence[np.ndarray], raw: np.ndarray, names: Mapping[int, str] | None,
            spec: DatasetSpec, split: str, where: _Where, check_names: bool = True) -> RawSplit:
  """Numbers the classes of one split and checks them against `spec`.

  Args:
    images: [n] images (their shapes are checked by the caller or the decoder).
    raw: [n] int64 class ids as the source stores them.
    names: raw id -> class identifier; None where the source has no names ("class_<id>").
    spec: what the split must hold.
    split: "train", "val" or "test".
    where: the file, for messages.
    check_names: with `names`, order the classes as spec.classes[split] and check that the sets
      agree; else order by raw id and check only the number of classes.

  Returns:
    The split with labels 0..C-1.
  """
  if len(images) != len(raw):
    raise where.error(f"holds {len(images)} images but {len(raw)} labels")
  want = spec.classes[split]
  ids, inverse = np.unique(raw, return_inverse=True)
  if names is not None:
    unnamed = [int(r) for r in ids if int(r) not in names]
    if unnamed:
      raise where.error(f"labels {unnamed[:3]} have no class name")
    idents = [names[int(r)] for r in ids]
  else:
    idents = [f"class_{int(r)}" for r in ids]
  if len(set(idents)) != len(idents):
    dup = next(c for c in idents if idents.count(c) > 1)
    raise where.error(f"two labels name the same class {dup}")
  if names is not None and check_names:
    present = set(idents)
    missing = [c for c in want if c not in present]
    extra = sorted(present - set(want))
    if missing or extra:
      parts = [f"{len(group)} {what} ({', '.join(group[:3])}{', ...' if len(group) > 3 else ''})"
               for group, what in ((missing, "missing"), (extra, "extra")) if group]
      raise where.error(f"the {split} classes are not the {spec.name} {split} split's: "
                        f"{' and '.join(parts)}")
    index = {c: i for i, c in enumerate(want)}
    labels = np.asarray([index[c] for c in idents], np.int64)[inverse]
    class_names = tuple(want)
  else:
    if len(ids) != len(want):
      raise where.error(f"the {split} split has {len(ids)} classes, {spec.name} wants "
                        f"{len(want)}")
    labels = inverse.astype(np.int64)
    class_names = tuple(idents)
  counts = np.bincount(labels, minlength=len(class_names))
  if spec.images_per_class is not None:
    bad = np.flatnonzero(counts != spec.images_per_class)
    if bad.size:
      raise where.error(f"{split} class {class_names[bad[0]]} has {counts[bad[0]]} images, "
                        f"{spec.name} wants {spec.images_per_class} per class ({bad.size} of "
                        f"{len(class_names)} classes differ)")
  return RawSplit(images, labels.reshape(-1), class_names)


# Pairs of splits whose class ids must not meet. Where classes have real identifiers all pairs
# are checked; where they are bare ids ("class_<id>"), only train against the others, as
# MetaOptNet asserts: val and test ids may be numbered independently.
_ALL_PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))
_TRAIN_PAIRS = _ALL_PAIRS[:2]


def _check_disjoint(out: dict[str, RawSplit], wheres: Mapping[str, _Where],
                    pairs: Sequence[tuple[str, str]] = _ALL_PAIRS) -> dict[str, RawSplit]:
  for a, b in pairs:
    common = sorted(set(out[a].class_names) & set(out[b].class_names))
    if common:
      raise wheres[b].error(
          f"{len(common)} {b} classes ({', '.join(common[:3])}) are also {a} classes (in "
          f"{wheres[a].path}); the splits must be disjoint")
  return out


def _decode_image(data: bytes | PathLike, where: _Where, what: str,
                  size: tuple[int, int] | None, mode: str,
                  shape: tuple[int, ...] | None) -> np.ndarray:
  """Decodes one image file or encoded bytes to uint8 [H, W, C].

  Args:
    data: a path, or the encoded bytes.
    where: the file, for messages.
    what: which image, for messages ("" for a whole file).
    size: (H, W) to resize to with LANCZOS where it differs; None keeps the size.
    mode: "RGB" or "L" ("L" gives [H, W, 1]).
    shape: (H, W, C) the result must have, or None.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top  (imported where images are read)

  try:
    with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as im:
      im = im.convert(mode)
      if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
      arr = np.asarray(im, dtype=np.uint8)
  except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, ...)
    raise where.error(f"{what}cannot be decoded as an image ({_short(e)})") from None
  if arr.ndim == 2:
    arr = arr[:, :, None]
  if shape is not None and arr.shape != tuple(shape):
    raise where.error(f"{what}has shape {list(arr.shape)}, not {list(shape)}")
  return arr


def _decode_file(path: str, where: _Where, size, mode, shape) -> np.ndarray:
  return _decode_image(path, where.at(path), "", size, mode, shape)


# What one item of an images_png pickle may be, for messages.
_ENCODED_ITEM = ("an encoded image: bytes, or a uint8 array of shape (n,) or (n, 1) as "
                 "cv2.imencode returns")


def _describe(item: Any) -> str:
  if isinstance(item, np.ndarray):
    return f"a {item.dtype} array of shape {tuple(item.shape)}"
  return f"a {type(item).__name__}"


def _encoded_image(item: Any) -> bytes | np.ndarray | None:
  """One encoded image file as bytes or a 1-D uint8 array (a view where possible).

  Takes every form the PNG pickles are known to hold: a 1-D uint8 array (cv2.imencode in some
  OpenCV versions), an (n, 1) one (in others), an object array of size 1 wrapping either, a
  row of a uint8 [num_images, n(, 1)] array (a list of equal-length buffers stacked by numpy),
  bytes, a Python 2 str, and cv2.imencode's whole (ok, buffer) pair.

  Returns:
    The encoded bytes, or None where `item` is not an encoded image (decoded pixels included:
    their channel order is unknown, so they are refused rather than guessed).
  """
  if isinstance(item, (bytes, bytearray, memoryview)):
    return bytes(item)
  if isinstance(item, str):
    # A Python 2 str of PNG bytes, which the latin1 fallback loads as text one char per byte.
    try:
      return item.encode("latin1")
    except UnicodeEncodeError:
      return None
  if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (bool, np.bool_))
      and isinstance(item[1], np.ndarray)):
    return _encoded_image(item[1])
  if not isinstance(item, np.ndarray):
    return None
  if item.dtype == object:
    if item.size == 1:
      return _encoded_image(item.reshape(-1)[0])
    try:  # numpy stacks equal-length buffers given dtype=object into arrays of ints
      item = np.asarray(item.tolist())
    except (ValueError, TypeError):
      return None
  if item.dtype.kind == "S" and item.size == 1:
    return bytes(item.reshape(-1)[0])
  # A buffer has one axis; any more of length > 1 means pixels (or something else).
  if item.size == 0 or sum(d > 1 for d in item.shape) > 1:
    return None
  if item.dtype in (np.uint8, np.int8):
    return np.ascontiguousarray(item).reshape(-1).view(np.uint8)
  if item.dtype.kind in "iu" and item.min() >= 0 and item.max() <= 255:
    return item.reshape(-1).astype(np.uint8)
  return None


def _png_items(obj: Any, where: _Where) -> Sequence[Any]:
  """The per-image items of an images_png pickle: a list, tuple or array over images."""
  if isinstance(obj, (list, tuple)):
    return obj
  if isinstance(obj, np.ndarray) and (obj.dtype == object and obj.ndim >= 1 or obj.ndim >= 2):
    return obj
  raise where.error(f"holds {_describe(obj)}, not a list of encoded images (one per image)")


# The first bytes of the image files PIL reads here (PNG, JPEG, GIF, BMP, WebP).
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
                     b"RIFF")


def _check_png_items(items: Sequence[Any], where: _Where) -> None:
  """Refuses, before anything is decoded or written, the first item that is not an image file.

  Only the form and the first bytes are checked (cheap for 450,000 items); a damaged file past
  its signature is found when it is decoded, and named then.
  """
  for i in range(len(items)):
    data = _encoded_image(items[i])
    if data is None:
      raise where.error(f"item {i} is {_describe(items[i])}, not {_ENCODED_ITEM}")
    head = bytes(data[:8])
    if not head.startswith(_IMAGE_SIGNATURES):
      raise where.error(f"item {i} is not an image file (it starts with bytes {head.hex(' ')}; "
                        "a PNG starts with 89 50 4e 47)")


def _decode_png_item(pngs: Sequence[Any], where: _Where, shape, i: int) -> np.ndarray:
  data = _encoded_image(pngs[i])
  if data is None:
    raise where.error(f"item {i} is {_describe(pngs[i])}, not {_ENCODED_ITEM}")
  if isinstance(data, np.ndarray):
    data = data.tobytes()
  return _decode_image(data, where, f"item {i} ", None, "RGB", shape)


def _mode(shape: tuple[int, ...] | None) -> str:
  return "L" if shape is not None and shape[-1] == 1 else "RGB"


# --- miniImageNet -----------------------------------------------------------------------------


def read_mini_imagenet(manual_dir: PathLike, spec: DatasetSpec) -> dict[str, RawSplit]:
  """Reads miniImageNet from any of its three layouts (see `detect_layout`).

  Args:
    manual_dir: the directory holding the Gidaris/MetaOptNet pickles, the cache pickles, or
      images/ with the Ravi & Larochelle CSVs.
    spec: what each split must hold (`standard_spec("mini_imagenet")` or a subset).

  Returns:
    {"train", "val", "test"} -> RawSplit; class names are wnids (or "class_<id>" for Gidaris
    pickles without 'catname2label'); JPEGs come as LazyImages.

  Raises:
    DataError: missing, corrupt or inconsistent files.
  """
  root = pathlib.Path(manual_dir)
  name = detect_layout("mini_imagenet", root)
  layout = _layout("mini_imagenet", name)
  reader = {"gidaris_pickles": _read_mini_gidaris, "cache_pickles": _read_mini_cache,
            "jpeg": _read_mini_jpeg}[name]
  return reader(root, spec, layout)


def _read_mini_gidaris(root: pathlib.Path, spec: DatasetSpec, layout: _Layout):
  out, wheres, named = {}, {}, True
  for split in SPLITS:
    where = wheres[split] = _where(root / _GIDARIS_FILES[split], layout)
    obj = _dict(_load_pickle(root / _GIDARIS_FILES[split], where, _PY2), where,
                ("data", "labels"))
    images = _uint8_images(obj["data"], where, spec.image_shape)
    raw = _int_labels(obj["labels"], where)
    names = None
    if "catname2label" in obj:
      # {wnid: label}: the labels are the pickle's own (global) ids, so invert the map.
      cat = _dict(obj["catname2label"], where, ())
      names = {}
      for wnid, label in cat.items():
        label = int(_int_labels([label], where, "catname2label values")[0])
        if label in names:
          raise where.error(f"catname2label maps both {names[label]} and {wnid} to {label}")
        names[label] = str(wnid)
    named = named and names is not None
    out[split] = _finish(images, raw, names, spec, split, where)
  return _check_disjoint(out, wheres, _ALL_PAIRS if named else _TRAIN_PAIRS)


def _read_mini_cache(root: pathlib.Path, spec: DatasetSpec, layout: _Layout):
  out, wheres = {}, {}
  for split in SPLITS:
    path = root / _CACHE_FILES[split]
    where = wheres[split] = _where(path, layout)
    obj = _dict(_load_pickle(path, where, _PY2), where, ("image_data", "class_dict"))
    images = _uint8_images(obj["image_data"], where, spec.image_shape)
    class_dict = _dict(obj["class_dict"], where, ())
    raw = np.full(len(images), -1, np.int64)
    names = {}
    for i, (wnid, indices) in enumerate(sorted(class_dict.items())):
      idx = _int_labels(indices, where, f"class_dict[{wnid!r}]")
      if idx.size and (idx.min() < 0 or idx.max() >= len(images)):
        raise where.error(f"class_dict[{wnid!r}] indexes images outside 0..{len(images) - 1}")
      if np.any(raw[idx] >= 0) or len(np.unique(idx)) != len(idx):
        raise where.error(f"class_dict lists an image twice (class {wnid})")
      raw[idx] = i
      names[i] = str(wnid)
    if np.any(raw < 0):
      raise where.error(f"{int(np.sum(raw < 0))} images of image_data are in no class of "
                        "class_dict")
    out[split] = _finish(images, raw, names, spec, split, where)
  return _check_disjoint(out, wheres)


def _read_mini_jpeg(root: pathlib.Path, spec: DatasetSpec, layout: _Layout):
  images_dir = root / "images"
  where_dir = _where(images_dir, layout)
  if not images_dir.is_dir():
    raise where_dir.error("is not a directory")
  try:
    present = set(os.listdir(images_dir))
  except OSError as e:
    raise where_dir.error(f"cannot be listed ({_short(e)})") from None
  shape = spec.image_shape
  size = (84, 84) if shape is None else tuple(shape[:2])
  out, wheres = {}, {}
  for split in SPLITS:
    csv_path = root / f"{split}.csv"
    if csv_path.exists():
      where = _where(csv_path, layout)
      rows = _read_filename_label_csv(csv_path, where)
    else:
      # The packaged Ravi & Larochelle CSV, restricted to the spec's classes (a subset spec).
      where = dataclasses.replace(where_dir, path=f"{images_dir} (with the packaged {split}.csv)")
      keep = set(spec.classes[split])
      rows = [r for r in mini_imagenet_filenames(split) if r[1] in keep]
    wheres[split] = where
    missing = [f for f, _ in rows if f not in present]
    if missing:
      raise where_dir.at(images_dir / missing[0]).error(
          f"missing: {len(missing)} of the {len(rows)} images the {split} CSV lists are not in "
          f"{images_dir}")
    wnids = sorted({w for _, w in rows})
    index = {w: i for i, w in enumerate(wnids)}
    raw = np.asarray([index[w] for _, w in rows], np.int64)
    paths = [os.fspath(images_dir / f) for f, _ in rows]
    images = LazyImages(paths, functools.partial(_decode_file, where=where_dir, size=size,
                                                 mode=_mode(shape), shape=shape))
    out[split] = _finish(images, raw, dict(enumerate(wnids)), spec, split, where)
    if len(images):
      images[0]  # pylint: disable=pointless-statement  (fail now on a systematic problem)
  return _check_disjoint(out, wheres)


def _read_filename_label_csv(path: pathlib.Path, where: _Where) -> list[tuple[str, str]]:
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise where.error(f"cannot be read as CSV ({_short(e)})") from None
  if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
    raise where.error(f"has header {rows[0] if rows else 'nothing'}, not filename,label")
  body = [r for r in rows[1:] if r]
  bad = [i for i, r in enumerate(body) if len(r) != 2]
  if bad:
    raise where.error(f"row {bad[0] + 2} has {len(body[bad[0]])} fields, not 2")
  return [(r[0].strip(), r[1].strip()) for r in body]


# --- tieredImageNet ---------------------------------------------------------------------------


def read_tiered_imagenet(manual_dir: PathLike, spec: DatasetSpec) -> dict[str, RawSplit]:
  """Reads tieredImageNet from Ren et al.'s PNG pickles or MetaOptNet's npz files.

  Ren et al.'s files: images decode with PIL to RGB (the PNGs are standard files, so OpenCV's
  BGR convention does not apply). Each item of the PNG list may be bytes or a uint8 array of
  shape (n,) or (n, 1), as `cv2.imencode` returns it depending on the OpenCV version; the list
  may also be a numpy object array (`_encoded_image` lists every form). An item that is not an
  image file is refused when the files are read, naming its index. Classes are wnids when
  synsets.txt and class_names.txt are in `manual_dir` (checked against spec), else the
  human-readable 'label_specific_str' names (only their number is checked). 'label_general'
  is not used: older copies hold wrong values.

  MetaOptNet's files: the npz arrays are BGR (written by OpenCV), so the channel axis is flipped
  to RGB (a view, not a copy). Classes are "class_<id>"; train ids must not meet val or test ids.

  Args:
    manual_dir: the directory holding either layout.
    spec: what each split must hold.

  Returns:
    {"train", "val", "test"} -> RawSplit.

  Raises:
    DataError: missing, corrupt or inconsistent files.
  """
  root = pathlib.Path(manual_dir)
  name = detect_layout("tiered_imagenet", root)
  layout = _layout("tiered_imagenet", name)
  if name == "ren_png_pickles":
    return _read_tiered_ren(root, spec, layout)
  return _read_tiered_metaoptnet(root, spec, layout)


def _read_lines(path: pathlib.Path, where: _Where) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return [line.rstrip("\r\n") for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise where.error(f"cannot be read as text ({_short(e)})") from None


def _tiered_name_to_wnids(root: pathlib.Path, layout: _Layout) -> dict[str, list[str]] | None:
  """Human class name -> wnids, from synsets.txt and class_names.txt; None if either is absent."""
  synsets, names = root / "synsets.txt", root / "class_names.txt"
  if not (synsets.exists() and names.exists()):
    return None
  wnids = _read_lines(synsets, _where(synsets, layout))
  texts = _read_lines(names, _where(names, layout))
  if len(wnids) != len(texts):
    raise _where(names, layout).error(f"has {len(texts)} lines but synsets.txt has "
                                      f"{len(wnids)}; they must align line by line")
  out: dict[str, list[str]] = {}
  for wnid, text in zip(wnids, texts):
    out.setdefault(text.strip(), []).append(wnid.strip())
  return out


def _read_tiered_ren(root: pathlib.Path, spec: DatasetSpec, layout: _Layout):
  name_to_wnids = _tiered_name_to_wnids(root, layout)
  out, wheres = {}, {}
  for split in SPLITS:
    img_path, lab_path = root / f"{split}_images_png.pkl", root / f"{split}_labels.pkl"
    where_img, where_lab = _where(img_path, layout), _where(lab_path, layout)
    wheres[split] = where_lab
    pngs = _png_items(_load_pickle(img_path, where_img, _PY2 + ("bytes",)), where_img)
    _check_png_items(pngs, where_img)
    # Ren's read_cache tries encoding="bytes" (bytes keys) first, then a plain load.
    obj = _dict(_load_pickle(lab_path, where_lab, ("bytes",) + _PY2), where_lab,
                ("label_specific", "label_specific_str"))
    raw = _int_labels(obj["label_specific"], where_lab, "label_specific")
    strs = obj["label_specific_str"]
    if not isinstance(strs, (list, tuple)):
      raise where_lab.error(f"label_specific_str is a {type(strs).__name__}, not a list")
    strs = [str(_to_str(s)).strip() for s in strs]
    if raw.size and (raw.min() < 0 or raw.max() >= len(strs)):
      raise where_lab.error(f"label_specific holds {raw.min()}..{raw.max()}, outside the "
                            f"{len(strs)} names of label_specific_str")
    if name_to_wnids is None:
      # Human names, ordered by label_specific index; homonyms within a split are told apart.
      names = {i: s if strs.count(s) == 1 else f"{s} ({i})" for i, s in enumerate(strs)}
      check = False
    else:
      want = set(spec.classes[split])
      names, check = {}, True
      for i, s in enumerate(strs):
        cands = name_to_wnids.get(s)
        if not cands:
          raise where_lab.error(f"class name {s!r} is not in class_names.txt")
        inside = [w for w in cands if w in want]
        if len(inside) > 1:
          raise where_lab.error(f"class name {s!r} names several {split} wnids "
                                f"({', '.join(inside)}); cannot tell them apart")
        names[i] = (inside or cands)[0]
    images = LazyImages(range(len(pngs)), functools.partial(
        _decode_png_item, pngs, where_img, spec.image_shape))
    out[split] = _finish(images, raw, names, spec, split, where_lab, check_names=check)
    if len(images):
      images[0]  # pylint: disable=pointless-statement  (fail now on a systematic problem)
  return _check_disjoint(out, wheres)


def _read_tiered_metaoptnet(root: pathlib.Path, spec: DatasetSpec, layout: _Layout):
  out, wheres = {}, {}
  for split in SPLITS:
    npz_path, lab_path = root / f"{split}_images.npz", root / f"{split}_labels.pkl"
    where_npz, where_lab = _where(npz_path, layout), _where(lab_path, layout)
    wheres[split] = where_lab
    images = _load_npz_images(npz_path, where_npz)
    images = _uint8_images(images, where_npz, spec.image_shape)[..., ::-1]  # BGR -> RGB
    obj = _dict(_load_pickle(lab_path, where_lab, _PY2 + ("bytes",)), where_lab, ("labels",))
    raw = _int_labels(obj["labels"], where_lab)
    if len(raw) != len(images):
      raise where_lab.error(f"holds {len(raw)} labels but {npz_path.name} holds {len(images)} "
                            "images")
    out[split] = _finish(images, raw, None, spec, split, where_lab)
  return _check_disjoint(out, wheres, _TRAIN_PAIRS)


def _load_npz_images(path: pathlib.Path, where: _Where) -> np.ndarray:
  if not path.is_file():
    raise where.error("missing")
  try:
    with np.load(path, allow_pickle=False) as archive:
      if not hasattr(archive, "files"):
        raise where.error("is a single .npy array, not an .npz archive")
      if "images" not in archive.files:
        raise where.error(f"has no array 'images' (its arrays: {', '.join(archive.files)})")
      return archive["images"]
  except DataError:
    raise
  except Exception as e:  # noqa: BLE001  (zip, zlib, npy header errors)
    raise where.error(f"cannot be read as an .npz archive ({_short(e)}); the file is truncated "
                      "or corrupt") from None


# --- CIFAR-FS and FC100 -----------------------------------------------------------------------


def read_cifar_fs(manual_dir: PathLike | None, spec: DatasetSpec,
                  archive_md5: str | None = CIFAR100_MD5,
                  archive: PathLike | None = None) -> dict[str, RawSplit]:
  """Reads CIFAR-FS from the CIFAR-100 python archive or MetaOptNet's pickles.

  Args:
    manual_dir: the directory holding cifar-100-python.tar.gz or CIFAR_FS_{split}.pickle (may
      be None when `archive` is given).
    spec: what each split must hold.
    archive_md5: the md5 the archive must have; None skips the check (tests).
    archive: the archive's path, overriding `manual_dir` (a download).

  Returns:
    {"train", "val", "test"} -> RawSplit with CIFAR-100 fine names as class names (or
    "class_<id>" for pickles whose labels are not CIFAR-100 fine ids).

  Raises:
    DataError: missing, corrupt or inconsistent files.
  """
  return _read_cifar("cifar_fs", "CIFAR_FS", manual_dir, spec, archive_md5, archive)


def read_fc100(manual_dir: PathLike | None, spec: DatasetSpec,
               archive_md5: str | None = CIFAR100_MD5,
               archive: PathLike | None = None) -> dict[str, RawSplit]:
  """Reads FC100 from the CIFAR-100 python archive or MetaOptNet's pickles.

  From the archive, each image's coarse label is also checked against the superclass of its fine
  class (`fc100_classes`). Arguments and result as `read_cifar_fs`.
  """
  return _read_cifar("fc100", "FC100", manual_dir, spec, archive_md5, archive)


def _read_cifar(dataset: str, prefix: str, manual_dir, spec, archive_md5, archive):
  if archive is None:
    if manual_dir is None:
      raise DataError(f"{dataset} needs a directory holding {CIFAR100_ARCHIVE} or "
                      f"{prefix}_{{train,val,test}}.pickle")
    root = pathlib.Path(manual_dir)
    name = detect_layout(dataset, root)
    if name == "metaoptnet_pickles":
      return _read_cifar_pickles(dataset, prefix, root, spec)
    archive = root / CIFAR100_ARCHIVE
  return _read_cifar_archive(dataset, pathlib.Path(archive), spec, archive_md5)


def _md5(path: pathlib.Path) -> str:
  digest = hashlib.md5(usedforsecurity=False)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _read_cifar100(path: pathlib.Path, where: _Where, archive_md5: str | None):
  """(images uint8 [N, 32, 32, 3], fine ids [N], coarse ids [N], fine names, coarse names).

  Train then test, read from the tar without extracting it.
  """
  if not path.is_file():
    raise where.error("missing")
  try:
    if archive_md5 is not None:
      got = _md5(path)
      if got != archive_md5.lower():
        raise where.error(f"has md5 {got}, not the expected {archive_md5}; re-download it from "
                          f"{CIFAR100_URL}")
    members = {}
    with tarfile.open(path, "r:gz") as tar:
      for member in ("train", "test", "meta"):
        name = f"cifar-100-python/{member}"
        try:
          f = tar.extractfile(name)
        except KeyError:
          raise where.error(f"has no member {name}") from None
        if f is None:
          raise where.error(f"member {name} is not a file")
        # The CIFAR page's own recipe: encoding="bytes" gives bytes keys.
        members[member] = _dict(
            _unpickle(io.BytesIO(f.read()), where.at(f"{path}:{name}"), ("bytes", "latin1")),
            where.at(f"{path}:{name}"),
            ("fine_label_names", "coarse_label_names") if member == "meta"
            else ("data", "fine_labels", "coarse_labels"))
  except DataError:
    raise
  except Exception as e:  # noqa: BLE001  (tar, gzip, zlib, EOF errors of a damaged archive)
    raise where.error(f"cannot be read as a .tar.gz archive ({_short(e)}); the file is "
                      "truncated or corrupt") from None
  fine_names = [str(_to_str(n)) for n in members["meta"]["fine_label_names"]]
  coarse_names = [str(_to_str(n)) for n in members["meta"]["coarse_label_names"]]
  parts = []
  for member in ("train", "test"):
    w = where.at(f"{path}:cifar-100-python/{member}")
    d = members[member]
    data = np.asarray(d["data"])
    if data.ndim != 2 or data.shape[1] != 3072:
      raise w.error(f"data has shape {list(data.shape)}, not [n, 3072]")
    # Rows hold 1024 red, 1024 green, then 1024 blue values, each plane row-major.
    images = _uint8_images(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), w, (32, 32, 3))
    fine = _int_labels(d["fine_labels"], w, "fine_labels")
    coarse = _int_labels(d["coarse_labels"], w, "coarse_labels")
    if not len(fine) == len(coarse) == len(images):
      raise w.error(f"holds {len(images)} images, {len(fine)} fine and {len(coarse)} coarse "
                    "labels")
    for labels, names, what in ((fine, fine_names, "fine"), (coarse, coarse_names, "coarse")):
      if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise w.error(f"{what}_labels hold {labels.min()}..{labels.max()}, outside the "
                      f"{len(names)} {what} names of meta")
    parts.append((images, fine, coarse))
  images = np.concatenate([p[0] for p in parts])
  fine = np.concatenate([p[1] for p in parts])
  coarse = np.concatenate([p[2] for p in parts])
  return images, fine, coarse, fine_names, coarse_names


def _read_cifar_archive(dataset: str, path: pathlib.Path, spec: DatasetSpec,
                        archive_md5: str | None) -> dict[str, RawSplit]:
  where = _where(path, _CIFAR_ARCHIVE_LAYOUT)
  images, fine, coarse, fine_names, coarse_names = _read_cifar100(path, where, archive_md5)
  if dataset == "fc100":
    # The superclass of every image must be its fine class's (an archive consistency check).
    superclass = {f: s for split in SPLITS for s, f in fc100_classes(split)}
    want = np.asarray([superclass.get(n, "") for n in fine_names], object)[fine]
    got = np.asarray(coarse_names, object)[coarse]
    bad = np.flatnonzero(want != got)
    if bad.size:
      i = bad[0]
      raise where.error(f"{bad.size} images have a coarse label that is not their fine class's "
                        f"superclass (image {i}: {fine_names[fine[i]]} is in {want[i]}, labelled "
                        f"{got[i]})")
  index = {n: i for i, n in enumerate(fine_names)}
  out = {}
  for split in SPLITS:
    absent = [c for c in spec.classes[split] if c not in index]
    if absent:
      raise where.error(f"has no CIFAR-100 class {', '.join(absent[:3])} (of the {split} split)")
    ids = [index[c] for c in spec.classes[split]]
    keep = np.flatnonzero(np.isin(fine, ids))
    out[split] = _finish(images[keep], fine[keep], {i: fine_names[i] for i in ids}, spec, split,
                         where)
  return _check_disjoint(out, {s: where for s in SPLITS})


def _read_cifar_pickles(dataset: str, prefix: str, root: pathlib.Path,
                        spec: DatasetSpec) -> dict[str, RawSplit]:
  layout = _layout(dataset, "metaoptnet_pickles")
  read, wheres = {}, {}
  for split in SPLITS:
    path = root / f"{prefix}_{split}.pickle"
    where = wheres[split] = _where(path, layout)
    obj = _dict(_load_pickle(path, where, _PY2), where, ("data", "labels"))
    read[split] = (_uint8_images(obj["data"], where, spec.image_shape),
                   _int_labels(obj["labels"], where))
  # The labels are probably CIFAR-100 fine ids (not verified on the released files): use the
  # fine names only where every split's ids are exactly the spec's classes.
  fine = cifar100_fine_names()
  named = all(
      labels.size and labels.min() >= 0 and labels.max() < len(fine)
      and {fine[i] for i in np.unique(labels)} == set(spec.classes[split])
      for split, (_, labels) in read.items())
  if not named:
    logger.warning("%s: the labels of %s_{train,val,test}.pickle are not CIFAR-100 fine ids of "
                   "the %s splits; classes are named class_<id> and only counted", root, prefix,
                   dataset)
  out = {split: _finish(images, labels, dict(enumerate(fine)) if named else None, spec, split,
                        wheres[split])
         for split, (images, labels) in read.items()}
  return _check_disjoint(out, wheres, _ALL_PAIRS if named else _TRAIN_PAIRS)


# --- a user's image folder --------------------------------------------------------------------


def read_image_folder(root: PathLike, image_size: tuple[int, int] = (84, 84),
                      channels: int = 3) -> dict[str, RawSplit]:
  """Reads root/{train,val,test}/<class>/<image files> as LazyImages.

  Class names are the folder names, sorted; files are sorted by name. Files whose suffix is not
  an image suffix (case-insensitive) and hidden files and folders are ignored. An unreadable
  image raises DataError naming it when it is decoded.

  Args:
    root: the folder holding train/, val/ and test/.
    image_size: (H, W) every image is resized to (LANCZOS).
    channels: 3 (RGB) or 1 (grayscale, [H, W, 1]).

  Returns:
    {"train", "val", "test"} -> RawSplit of uint8 [H, W, channels] images.

  Raises:
    DataError: a missing folder, a split with fewer than 2 classes, an empty class folder, a
      class in two splits.
  """
  root = pathlib.Path(root)
  where = _Where(os.fspath(root), _IMAGE_FOLDER_EXPECTED, _IMAGE_FOLDER_SOURCE)
  if channels not in (1, 3):
    raise where.error(f"channels must be 1 or 3, got {channels}")
  size = (int(image_size[0]), int(image_size[1]))
  shape = (*size, channels)
  if not root.is_dir():
    raise where.error("no such directory")
  out, wheres, seen = {}, {}, {}
  for split in SPLITS:
    split_dir = root / split
    w = wheres[split] = where.at(split_dir)
    if not split_dir.is_dir():
      raise w.error(f"missing: the {split} folder")
    classes = sorted(d.name for d in split_dir.iterdir()
                     if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
      raise w.error(f"holds {len(classes)} class folders; a split needs at least 2")
    paths, labels = [], []
    for label, name in enumerate(classes):
      if name in seen:
        raise w.at(split_dir / name).error(
            f"class {name!r} is also in the {seen[name]} split ({root / seen[name] / name})")
      seen[name] = split
      files = sorted(f.name for f in (split_dir / name).iterdir()
                     if not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
                     and f.is_file())
      if not files:
        raise w.at(split_dir / name).error("holds no image files")
      paths += [os.fspath(split_dir / name / f) for f in files]
      labels += [label] * len(files)
    images = LazyImages(paths, functools.partial(
        _decode_file, where=w, size=size, mode="RGB" if channels == 3 else "L", shape=shape))
    out[split] = RawSplit(images, np.asarray(labels, np.int64), tuple(classes))
  return out
