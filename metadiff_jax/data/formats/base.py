"""What every reader shares: the split it returns, where a problem is, and the checks.

`Where` names the file being read with what it should hold and where such files come from, so
that every `DataError` is one line a user can act on. `number_classes` and `check_disjoint` check
what a reader read against the dataset's `DatasetSpec`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from metadiff_jax.data.errors import DataError
from metadiff_jax.data.spec import DatasetSpec

PathLike = str | os.PathLike


class LazyImages(Sequence):
  """Images decoded on demand: `items[i]` is raw (bytes, a path, ...); `decode(item)` gives
  uint8 [H, W, C]."""

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


@dataclasses.dataclass(frozen=True)
class Where:
  """The file being read, with what it should hold and where it comes from (for messages)."""

  path: str
  expected: str
  source: str

  def error(self, problem: str) -> DataError:
    return DataError(f"{self.path}: {problem}; expected {self.expected}; such files come from "
                     f"{self.source}")

  def at(self, path: PathLike) -> Where:
    return dataclasses.replace(self, path=os.fspath(path))


def short_error(e: BaseException) -> str:
  """An exception as one short line: its type and the start of its message."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def file_md5(path: PathLike) -> str:
  """The md5 hex digest of a file, read in blocks of 1 MiB."""
  digest = hashlib.md5(usedforsecurity=False)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def int_labels(values: Any, where: Where, what: str = "labels") -> np.ndarray:
  """Labels as int64 [n], refusing non-integer or non-finite values."""
  try:
    arr = np.asarray(values)
  except Exception as e:  # noqa: BLE001
    raise where.error(f"{what} are not an array of integers ({short_error(e)})") from None
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


def uint8_images(images: Any, where: Where, shape: tuple[int, ...] | None) -> np.ndarray:
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


def number_classes(images: Sequence[np.ndarray], raw: np.ndarray,
                   names: Mapping[int, str] | None, spec: DatasetSpec, split: str, where: Where,
                   check_names: bool = True) -> RawSplit:
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
ALL_PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))
TRAIN_PAIRS = ALL_PAIRS[:2]


def check_disjoint(out: dict[str, RawSplit], wheres: Mapping[str, Where],
                   pairs: Sequence[tuple[str, str]] = ALL_PAIRS) -> dict[str, RawSplit]:
  """Returns `out` once no two splits of `pairs` share a class; `wheres` name their files."""
  for a, b in pairs:
    common = sorted(set(out[a].class_names) & set(out[b].class_names))
    if common:
      raise wheres[b].error(
          f"{len(common)} {b} classes ({', '.join(common[:3])}) are also {a} classes (in "
          f"{wheres[a].path}); the splits must be disjoint")
  return out
