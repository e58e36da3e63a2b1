"""A user's own images: root/{train,val,test}/<class>/<image files>."""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np

from metadiff_jax.data.formats.base import LazyImages, PathLike, RawSplit, Where
from metadiff_jax.data.formats.images import decode_file
from metadiff_jax.data.spec import SPLITS

# Suffixes `read_image_folder` takes as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# What an image folder holds, for messages.
EXPECTED = ("root/{train,val,test}/<class name>/<image files> (.jpg .jpeg .png .bmp .gif .webp), "
            "at least 2 classes per split, no class in two splits")
_SOURCE = "your own images, arranged by split and class"


def class_folders(split_dir: pathlib.Path) -> list[str]:
  """The names of the class folders in a split folder, sorted; hidden ones are left out."""
  return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def image_files(class_dir: pathlib.Path) -> list[str]:
  """The names of the image files in a class folder, sorted: an image suffix in any case, not
  hidden."""
  return sorted(f.name for f in class_dir.iterdir()
                if not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
                and f.is_file())


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
  where = Where(os.fspath(root), EXPECTED, _SOURCE)
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
    classes = class_folders(split_dir)
    if len(classes) < 2:
      raise w.error(f"holds {len(classes)} class folders; a split needs at least 2")
    paths, labels = [], []
    for label, name in enumerate(classes):
      if name in seen:
        raise w.at(split_dir / name).error(
            f"class {name!r} is also in the {seen[name]} split ({root / seen[name] / name})")
      seen[name] = split
      files = image_files(split_dir / name)
      if not files:
        raise w.at(split_dir / name).error("holds no image files")
      paths += [os.fspath(split_dir / name / f) for f in files]
      labels += [label] * len(files)
    images = LazyImages(paths, functools.partial(
        decode_file, where=w, size=size, mode="RGB" if channels == 3 else "L", shape=shape))
    out[split] = RawSplit(images, np.asarray(labels, np.int64), tuple(classes))
  return out
