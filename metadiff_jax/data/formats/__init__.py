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

One module per family of formats:
- `mini_imagenet`, `tiered_imagenet`, `cifar` (CIFAR-FS and FC100), `image_folder` (a user's
  own images): the readers, each with the layouts it knows (`LAYOUTS`).
- `layouts`: a layout's description and telling which one a folder holds.
- `base`: `RawSplit`, `LazyImages`, the one-line errors (`Where`) and the checks every reader
  makes; `pickles`: the safe unpickler; `images`: decoding one image file.
"""

from __future__ import annotations

import pathlib

from metadiff_jax.data.errors import DataError
from metadiff_jax.data.formats import cifar, image_folder, layouts, mini_imagenet, tiered_imagenet
from metadiff_jax.data.formats.base import LazyImages, PathLike, RawSplit, file_md5
from metadiff_jax.data.formats.cifar import (CIFAR100_ARCHIVE, CIFAR100_MD5, CIFAR100_URL,
                                             read_cifar_fs, read_fc100)
from metadiff_jax.data.formats.image_folder import IMAGE_EXTENSIONS, read_image_folder
from metadiff_jax.data.formats.mini_imagenet import read_mini_imagenet
from metadiff_jax.data.formats.tiered_imagenet import read_tiered_imagenet
from metadiff_jax.data.spec import SPLITS

# Every benchmark's layouts, in order of preference.
LAYOUTS: dict[str, tuple[layouts.Layout, ...]] = {
    **mini_imagenet.LAYOUTS, **tiered_imagenet.LAYOUTS, **cifar.LAYOUTS}


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
      raise DataError(f"{root}: not an image folder; expected {image_folder.EXPECTED}")
    return "image_folder"
  if dataset not in LAYOUTS:
    raise DataError(f"no readers for dataset {dataset!r}; known: {', '.join(LAYOUTS)}, "
                    "image_folder")
  return layouts.detect(dataset, LAYOUTS[dataset], root).name


__all__ = [
    "CIFAR100_ARCHIVE", "CIFAR100_MD5", "CIFAR100_URL", "IMAGE_EXTENSIONS", "LAYOUTS",
    "LazyImages", "PathLike", "RawSplit", "detect_layout", "file_md5", "read_cifar_fs",
    "read_fc100", "read_image_folder", "read_mini_imagenet", "read_tiered_imagenet",
]
