"""miniImageNet: the Gidaris/MetaOptNet pickles, the cache pickles, or the JPEGs with CSVs."""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import pathlib

import numpy as np

from metadiff_jax.data.formats import layouts
from metadiff_jax.data.formats.base import (ALL_PAIRS, TRAIN_PAIRS, LazyImages, PathLike, RawSplit,
                                            Where, check_disjoint, int_labels, number_classes,
                                            short_error, uint8_images)
from metadiff_jax.data.formats.images import decode_file, image_mode
from metadiff_jax.data.formats.layouts import METAOPTNET_SOURCE, Layout
from metadiff_jax.data.formats.pickles import PY2, as_dict, load_pickle
from metadiff_jax.data.spec import SPLITS, DatasetSpec, mini_imagenet_filenames

_GIDARIS_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
# The cache pickles call the validation split "validation".
_CACHE_FILES = {s: f"mini-imagenet-cache-{'validation' if s == 'val' else s}.pkl" for s in SPLITS}

LAYOUTS = {
    "mini_imagenet": (
        Layout("gidaris_pickles", tuple(_GIDARIS_FILES.values()), tuple(_GIDARIS_FILES.values()),
               "miniImageNet_category_split_{train_phase_train,val,test}.pickle, each a pickled "
               "dict with 'data' uint8 [n, 84, 84, 3], 'labels' (n ints) and optionally "
               "'catname2label' {wnid: label}",
               f"{METAOPTNET_SOURCE} for miniImageNet (Gidaris & Komodakis' pickles, also read "
               "by the original MetaDiff)"),
        Layout("cache_pickles", tuple(_CACHE_FILES.values()), tuple(_CACHE_FILES.values()),
               "mini-imagenet-cache-{train,validation,test}.pkl, each a pickled dict with "
               "'image_data' uint8 [n, 84, 84, 3] and 'class_dict' {wnid: [image indices]}",
               "the mini-imagenet-cache pickles that learn2learn's MiniImagenet downloads"),
        Layout("jpeg", ("images",), ("images",),
               "images/<wnid><8 digits>.jpg (600 per class) and optionally the Ravi & "
               "Larochelle {train,val,test}.csv (header filename,label; the packaged copies are "
               "used when absent)",
               "a miniImageNet JPEG release made from ILSVRC-2012 train images with the Ravi & "
               "Larochelle CSVs (e.g. by yaoyao-liu/mini-imagenet-tools)"),
    ),
}


def read_mini_imagenet(manual_dir: PathLike, spec: DatasetSpec) -> dict[str, RawSplit]:
  """Reads miniImageNet from any of its three layouts (`LAYOUTS`, in order of preference).

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
  readers = {"gidaris_pickles": _read_mini_gidaris, "cache_pickles": _read_mini_cache,
             "jpeg": _read_mini_jpeg}
  return layouts.read("mini_imagenet", LAYOUTS["mini_imagenet"], readers, manual_dir, spec)


def _read_mini_gidaris(root: pathlib.Path, spec: DatasetSpec, layout: Layout):
  out, wheres, named = {}, {}, True
  for split in SPLITS:
    where = wheres[split] = layout.where(root / _GIDARIS_FILES[split])
    obj = as_dict(load_pickle(root / _GIDARIS_FILES[split], where, PY2), where,
                  ("data", "labels"))
    images = uint8_images(obj["data"], where, spec.image_shape)
    raw = int_labels(obj["labels"], where)
    names = None
    if "catname2label" in obj:
      # {wnid: label}: the labels are the pickle's own (global) ids, so invert the map.
      cat = as_dict(obj["catname2label"], where, ())
      names = {}
      for wnid, label in cat.items():
        label = int(int_labels([label], where, "catname2label values")[0])
        if label in names:
          raise where.error(f"catname2label maps both {names[label]} and {wnid} to {label}")
        names[label] = str(wnid)
    named = named and names is not None
    out[split] = number_classes(images, raw, names, spec, split, where)
  return check_disjoint(out, wheres, ALL_PAIRS if named else TRAIN_PAIRS)


def _read_mini_cache(root: pathlib.Path, spec: DatasetSpec, layout: Layout):
  out, wheres = {}, {}
  for split in SPLITS:
    path = root / _CACHE_FILES[split]
    where = wheres[split] = layout.where(path)
    obj = as_dict(load_pickle(path, where, PY2), where, ("image_data", "class_dict"))
    images = uint8_images(obj["image_data"], where, spec.image_shape)
    class_dict = as_dict(obj["class_dict"], where, ())
    raw = np.full(len(images), -1, np.int64)
    names = {}
    for i, (wnid, indices) in enumerate(sorted(class_dict.items())):
      idx = int_labels(indices, where, f"class_dict[{wnid!r}]")
      if idx.size and (idx.min() < 0 or idx.max() >= len(images)):
        raise where.error(f"class_dict[{wnid!r}] indexes images outside 0..{len(images) - 1}")
      if np.any(raw[idx] >= 0) or len(np.unique(idx)) != len(idx):
        raise where.error(f"class_dict lists an image twice (class {wnid})")
      raw[idx] = i
      names[i] = str(wnid)
    if np.any(raw < 0):
      raise where.error(f"{int(np.sum(raw < 0))} images of image_data are in no class of "
                        "class_dict")
    out[split] = number_classes(images, raw, names, spec, split, where)
  return check_disjoint(out, wheres)


def _read_mini_jpeg(root: pathlib.Path, spec: DatasetSpec, layout: Layout):
  images_dir = root / "images"
  where_dir = layout.where(images_dir)
  if not images_dir.is_dir():
    raise where_dir.error("is not a directory")
  try:
    present = set(os.listdir(images_dir))
  except OSError as e:
    raise where_dir.error(f"cannot be listed ({short_error(e)})") from None
  shape = spec.image_shape
  size = (84, 84) if shape is None else tuple(shape[:2])
  out, wheres = {}, {}
  for split in SPLITS:
    csv_path = root / f"{split}.csv"
    if csv_path.exists():
      where = layout.where(csv_path)
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
    images = LazyImages(paths, functools.partial(decode_file, where=where_dir, size=size,
                                                 mode=image_mode(shape), shape=shape))
    out[split] = number_classes(images, raw, dict(enumerate(wnids)), spec, split, where)
    if len(images):
      images[0]  # pylint: disable=pointless-statement  (fail now on a systematic problem)
  return check_disjoint(out, wheres)


def _read_filename_label_csv(path: pathlib.Path, where: Where) -> list[tuple[str, str]]:
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise where.error(f"cannot be read as CSV ({short_error(e)})") from None
  if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
    raise where.error(f"has header {rows[0] if rows else 'nothing'}, not filename,label")
  body = [r for r in rows[1:] if r]
  bad = [i for i, r in enumerate(body) if len(r) != 2]
  if bad:
    raise where.error(f"row {bad[0] + 2} has {len(body[bad[0]])} fields, not 2")
  return [(r[0].strip(), r[1].strip()) for r in body]
