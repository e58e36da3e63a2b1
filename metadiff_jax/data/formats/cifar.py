"""CIFAR-FS and FC100: the CIFAR-100 python archive, or MetaOptNet's pickles."""

from __future__ import annotations

import io
import logging
import pathlib
import tarfile

import numpy as np

from metadiff_jax.data.errors import DataError
from metadiff_jax.data.formats import layouts
from metadiff_jax.data.formats.base import (ALL_PAIRS, TRAIN_PAIRS, PathLike, RawSplit, Where,
                                            check_disjoint, file_md5, int_labels, number_classes,
                                            short_error, uint8_images)
from metadiff_jax.data.formats.layouts import METAOPTNET_SOURCE, Layout
from metadiff_jax.data.formats.pickles import PY2, as_dict, load_pickle, to_str, unpickle
from metadiff_jax.data.spec import SPLITS, DatasetSpec, cifar100_fine_names, fc100_classes

logger = logging.getLogger(__name__)

CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"


def _cifar_pickles_layout(prefix: str, drive_id: str) -> Layout:
  files = tuple(f"{prefix}_{s}.pickle" for s in SPLITS)
  return Layout(
      "metaoptnet_pickles", files, files,
      f"{prefix}_{{train,val,test}}.pickle, each a pickled dict with 'data' uint8 [n, 32, 32, 3] "
      "and 'labels' (n ints)",
      f"{METAOPTNET_SOURCE} for {prefix.replace('_', '-')} (id {drive_id})")


_ARCHIVE_LAYOUT = Layout(
    "cifar100_archive", (CIFAR100_ARCHIVE,), (CIFAR100_ARCHIVE,),
    f"{CIFAR100_ARCHIVE} (md5 {CIFAR100_MD5}) holding cifar-100-python/{{train,test,meta}}",
    CIFAR100_URL)

LAYOUTS = {
    "cifar_fs": (_ARCHIVE_LAYOUT,
                 _cifar_pickles_layout("CIFAR_FS", "1GjGMI0q3bgcpcB_CjI40fX54WgLPuTpS")),
    "fc100": (_ARCHIVE_LAYOUT,
              _cifar_pickles_layout("FC100", "1_ZsLyqI487NRDQhwvI7rg86FK3YAZvz1")),
}


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
    layout = layouts.detect(dataset, LAYOUTS[dataset], root)
    if layout.name == "metaoptnet_pickles":
      return _read_cifar_pickles(dataset, prefix, root, spec, layout)
    archive = root / CIFAR100_ARCHIVE
  return _read_cifar_archive(dataset, pathlib.Path(archive), spec, archive_md5)


def _read_cifar100(path: pathlib.Path, where: Where, archive_md5: str | None):
  """(images uint8 [N, 32, 32, 3], fine ids [N], coarse ids [N], fine names, coarse names).

  Train then test, read from the tar without extracting it.
  """
  if not path.is_file():
    raise where.error("missing")
  try:
    if archive_md5 is not None:
      got = file_md5(path)
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
        members[member] = as_dict(
            unpickle(io.BytesIO(f.read()), where.at(f"{path}:{name}"), ("bytes", "latin1")),
            where.at(f"{path}:{name}"),
            ("fine_label_names", "coarse_label_names") if member == "meta"
            else ("data", "fine_labels", "coarse_labels"))
  except DataError:
    raise
  except Exception as e:  # noqa: BLE001  (tar, gzip, zlib, EOF errors of a damaged archive)
    raise where.error(f"cannot be read as a .tar.gz archive ({short_error(e)}); the file is "
                      "truncated or corrupt") from None
  fine_names = [str(to_str(n)) for n in members["meta"]["fine_label_names"]]
  coarse_names = [str(to_str(n)) for n in members["meta"]["coarse_label_names"]]
  parts = []
  for member in ("train", "test"):
    w = where.at(f"{path}:cifar-100-python/{member}")
    d = members[member]
    data = np.asarray(d["data"])
    if data.ndim != 2 or data.shape[1] != 3072:
      raise w.error(f"data has shape {list(data.shape)}, not [n, 3072]")
    # Rows hold 1024 red, 1024 green, then 1024 blue values, each plane row-major.
    images = uint8_images(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), w, (32, 32, 3))
    fine = int_labels(d["fine_labels"], w, "fine_labels")
    coarse = int_labels(d["coarse_labels"], w, "coarse_labels")
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
  where = _ARCHIVE_LAYOUT.where(path)
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
    out[split] = number_classes(images[keep], fine[keep], {i: fine_names[i] for i in ids}, spec,
                                split, where)
  return check_disjoint(out, {s: where for s in SPLITS})


def _read_cifar_pickles(dataset: str, prefix: str, root: pathlib.Path, spec: DatasetSpec,
                        layout: Layout) -> dict[str, RawSplit]:
  read, wheres = {}, {}
  for split in SPLITS:
    path = root / f"{prefix}_{split}.pickle"
    where = wheres[split] = layout.where(path)
    obj = as_dict(load_pickle(path, where, PY2), where, ("data", "labels"))
    read[split] = (uint8_images(obj["data"], where, spec.image_shape),
                   int_labels(obj["labels"], where))
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
  out = {split: number_classes(images, labels, dict(enumerate(fine)) if named else None, spec,
                               split, wheres[split])
         for split, (images, labels) in read.items()}
  return check_disjoint(out, wheres, ALL_PAIRS if named else TRAIN_PAIRS)
