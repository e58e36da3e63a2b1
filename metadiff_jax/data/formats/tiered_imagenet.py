"""tieredImageNet: Ren et al.'s PNG pickles or MetaOptNet's npz files."""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from metadiff_jax.data.errors import DataError
from metadiff_jax.data.formats import layouts
from metadiff_jax.data.formats.base import (TRAIN_PAIRS, LazyImages, PathLike, RawSplit, Where,
                                            check_disjoint, int_labels, number_classes,
                                            short_error, uint8_images)
from metadiff_jax.data.formats.images import decode_image
from metadiff_jax.data.formats.layouts import METAOPTNET_SOURCE, Layout
from metadiff_jax.data.formats.pickles import PY2, as_dict, load_pickle, to_str
from metadiff_jax.data.spec import SPLITS, DatasetSpec

LAYOUTS = {
    "tiered_imagenet": (
        Layout("ren_png_pickles",
               tuple(f"{s}_{k}.pkl" for s in SPLITS for k in ("images_png", "labels")),
               tuple(f"{s}_images_png.pkl" for s in SPLITS),
               "{train,val,test}_images_png.pkl (a pickled list of PNG-encoded 84x84 images, "
               "each bytes or a uint8 array of shape (n,) or (n, 1)) and "
               "{train,val,test}_labels.pkl (a dict with 'label_specific' and "
               "'label_specific_str'), optionally synsets.txt and class_names.txt",
               "the tiered-imagenet tar linked from renmengye/few-shot-ssl-public's README "
               "(Google Drive id 1g1aIDy2Ar_MViF2gDXFYDBTR-HYecV07)"),
        Layout("metaoptnet_npz",
               tuple(f"{s}_{k}" for s in SPLITS for k in ("images.npz", "labels.pkl")),
               tuple(f"{s}_images.npz" for s in SPLITS),
               "{train,val,test}_images.npz (key 'images', uint8 [n, 84, 84, 3], BGR) and "
               "{train,val,test}_labels.pkl (a dict with 'labels', n ints)",
               f"{METAOPTNET_SOURCE} for tieredImageNet (id 1nVGCTd9ttULRXFezh4xILQ9lUkg0WZCG)"),
    ),
}


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
  readers = {"ren_png_pickles": _read_tiered_ren, "metaoptnet_npz": _read_tiered_metaoptnet}
  return layouts.read("tiered_imagenet", LAYOUTS["tiered_imagenet"], readers, manual_dir, spec)


def _read_lines(path: pathlib.Path, where: Where) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return [line.rstrip("\r\n") for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise where.error(f"cannot be read as text ({short_error(e)})") from None


def _tiered_name_to_wnids(root: pathlib.Path, layout: Layout) -> dict[str, list[str]] | None:
  """Human class name -> wnids, from synsets.txt and class_names.txt; None if either is absent."""
  synsets, names = root / "synsets.txt", root / "class_names.txt"
  if not (synsets.exists() and names.exists()):
    return None
  wnids = _read_lines(synsets, layout.where(synsets))
  texts = _read_lines(names, layout.where(names))
  if len(wnids) != len(texts):
    raise layout.where(names).error(f"has {len(texts)} lines but synsets.txt has "
                                    f"{len(wnids)}; they must align line by line")
  out: dict[str, list[str]] = {}
  for wnid, text in zip(wnids, texts):
    out.setdefault(text.strip(), []).append(wnid.strip())
  return out


def _read_tiered_ren(root: pathlib.Path, spec: DatasetSpec, layout: Layout):
  name_to_wnids = _tiered_name_to_wnids(root, layout)
  out, wheres = {}, {}
  for split in SPLITS:
    img_path, lab_path = root / f"{split}_images_png.pkl", root / f"{split}_labels.pkl"
    where_img, where_lab = layout.where(img_path), layout.where(lab_path)
    wheres[split] = where_lab
    pngs = _png_items(load_pickle(img_path, where_img, PY2 + ("bytes",)), where_img)
    _check_png_items(pngs, where_img)
    # Ren's read_cache tries encoding="bytes" (bytes keys) first, then a plain load.
    obj = as_dict(load_pickle(lab_path, where_lab, ("bytes",) + PY2), where_lab,
                  ("label_specific", "label_specific_str"))
    raw = int_labels(obj["label_specific"], where_lab, "label_specific")
    strs = obj["label_specific_str"]
    if not isinstance(strs, (list, tuple)):
      raise where_lab.error(f"label_specific_str is a {type(strs).__name__}, not a list")
    strs = [str(to_str(s)).strip() for s in strs]
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
    out[split] = number_classes(images, raw, names, spec, split, where_lab, check_names=check)
    if len(images):
      images[0]  # pylint: disable=pointless-statement  (fail now on a systematic problem)
  return check_disjoint(out, wheres)


def _read_tiered_metaoptnet(root: pathlib.Path, spec: DatasetSpec, layout: Layout):
  out, wheres = {}, {}
  for split in SPLITS:
    npz_path, lab_path = root / f"{split}_images.npz", root / f"{split}_labels.pkl"
    where_npz, where_lab = layout.where(npz_path), layout.where(lab_path)
    wheres[split] = where_lab
    images = _load_npz_images(npz_path, where_npz)
    images = uint8_images(images, where_npz, spec.image_shape)[..., ::-1]  # BGR -> RGB
    obj = as_dict(load_pickle(lab_path, where_lab, PY2 + ("bytes",)), where_lab, ("labels",))
    raw = int_labels(obj["labels"], where_lab)
    if len(raw) != len(images):
      raise where_lab.error(f"holds {len(raw)} labels but {npz_path.name} holds {len(images)} "
                            "images")
    out[split] = number_classes(images, raw, None, spec, split, where_lab)
  return check_disjoint(out, wheres, TRAIN_PAIRS)


def _load_npz_images(path: pathlib.Path, where: Where) -> np.ndarray:
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
    raise where.error(f"cannot be read as an .npz archive ({short_error(e)}); the file is "
                      "truncated or corrupt") from None


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


def _png_items(obj: Any, where: Where) -> Sequence[Any]:
  """The per-image items of an images_png pickle: a list, tuple or array over images."""
  if isinstance(obj, (list, tuple)):
    return obj
  if isinstance(obj, np.ndarray) and (obj.dtype == object and obj.ndim >= 1 or obj.ndim >= 2):
    return obj
  raise where.error(f"holds {_describe(obj)}, not a list of encoded images (one per image)")


# The first bytes of the image files PIL reads here (PNG, JPEG, GIF, BMP, WebP).
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
                     b"RIFF")


def _check_png_items(items: Sequence[Any], where: Where) -> None:
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


def _decode_png_item(pngs: Sequence[Any], where: Where, shape, i: int) -> np.ndarray:
  data = _encoded_image(pngs[i])
  if data is None:
    raise where.error(f"item {i} is {_describe(pngs[i])}, not {_ENCODED_ITEM}")
  if isinstance(data, np.ndarray):
    data = data.tobytes()
  return decode_image(data, where, f"item {i} ", None, "RGB", shape)
