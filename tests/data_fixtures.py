"""Writers of tiny fake datasets in the real on-disk formats of the few-shot benchmarks.

Each writer puts random images of a few classes into a directory, in exactly the layout (file
names, pickle keys, dtypes, Python 2 pickling, BGR storage, ...) that `data/formats/` reads, and
returns what a reader must give back: per split an `Expected` (images in the reader's order,
labels, class names). Test files import them as `from data_fixtures import ...` (pytest puts
tests/ on sys.path).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import pathlib
import pickle
import struct
import tarfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

from metadiff_jax.data.spec import (SPLITS, DatasetSpec, cifar100_coarse_names,
                                    cifar100_fine_names, fc100_classes, mini_imagenet_filenames,
                                    mini_imagenet_wnids)

# Default number of images per class where the spec leaves it open (images_per_class None).
DEFAULT_IMAGES_PER_CLASS = 3


@dataclasses.dataclass
class Expected:
  """What a reader must return for one split.

  Attributes:
    images: [n] uint8 [H, W, C] images in the reader's order (an array or a list).
    labels: [n] int64 labels in 0..C-1.
    class_names: the C class names in label order.
  """

  images: Sequence[np.ndarray]
  labels: np.ndarray
  class_names: tuple[str, ...]


# --- Python 2 pickles -------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes pickles as Python 2's cPickle (protocol 2) did.

  Python 2 had no bytes type: `str` was bytes, written with the SHORT_BINSTRING / BINSTRING
  opcodes, and numpy arrays pickled their raw data as such a str. Python 3 writes bytes with a
  `_codecs.encode` call instead, so its pickles load anywhere. A plain Python 3 `pickle.load`
  decodes BINSTRING as ASCII and fails (UnicodeDecodeError) on raw image data; loading needs
  encoding="latin1" (or "bytes"), which is what the readers must fall back to. Globals get
  Python 2's module names (numpy.core, __builtin__) as in files written then.
  """

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file):
    super().__init__(file, protocol=2)

  def save_py2_str(self, obj):
    data = obj if isinstance(obj, bytes) else obj.encode("latin1")
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
    self.memoize(obj)

  dispatch[bytes] = save_py2_str
  dispatch[str] = save_py2_str

  def save_global(self, obj, name=None):
    name = name or getattr(obj, "__qualname__", obj.__name__)
    module = pickle.whichmodule(obj, name)
    if module.startswith("numpy._core"):
      module = "numpy.core" + module[len("numpy._core"):]
    if module == "builtins":
      module = "__builtin__"
    self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
    self.memoize(obj)


def dump_py2(obj, path) -> None:
  """Pickles `obj` to `path` as Python 2 would have."""
  with open(path, "wb") as f:
    Py2Pickler(f).dump(obj)


def _dump(obj, path, py2: bool) -> None:
  if py2:
    dump_py2(obj, path)
  else:
    with open(path, "wb") as f:
      pickle.dump(obj, f, protocol=4)


# --- images -----------------------------------------------------------------------------------


def random_images(rng: np.random.Generator, n: int, height: int, width: int,
                  channels: int = 3) -> np.ndarray:
  """uint8 [n, H, W, C] of independent random pixels (lossless formats)."""
  return rng.integers(0, 256, (n, height, width, channels), dtype=np.uint8)


def smooth_images(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
  """uint8 [n, H, W, 3] of smooth random images: JPEG keeps them within a few levels."""
  out = np.empty((n, height, width, 3), np.uint8)
  for i in range(n):
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    out[i] = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC))
  return out


def _png_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg_bytes(image: np.ndarray) -> bytes:
  # Quality 100 without chroma subsampling: decoded pixels stay within a few levels.
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=100, subsampling=0)
  return buf.getvalue()


def _count(spec: DatasetSpec) -> int:
  return spec.images_per_class or DEFAULT_IMAGES_PER_CLASS


def _shape(spec: DatasetSpec, default=(84, 84, 3)) -> tuple[int, int, int]:
  return tuple(spec.image_shape or default)


def _labelled(rng: np.random.Generator, num_classes: int, per_class: int) -> np.ndarray:
  """[num_classes * per_class] labels, each class per_class times, shuffled (the file order)."""
  return rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int64)


# --- miniImageNet -----------------------------------------------------------------------------


def _mini_global_ids(spec: DatasetSpec, split: str) -> list[int]:
  """Gidaris-style global label ids: train 0..63, val 64..79, test 80..99 (standard order)."""
  offset = {"train": 0, "val": 64, "test": 80}[split]
  standard = mini_imagenet_wnids(split)
  return [offset + (standard.index(c) if c in standard else 100 + i)
          for i, c in enumerate(spec.classes[split])]


def write_mini_imagenet_gidaris(directory, spec: DatasetSpec, seed: int, py2: bool = True,
                                catname2label: bool = True) -> dict[str, Expected]:
  """miniImageNet_category_split_{train_phase_train,val,test}.pickle (Gidaris / MetaOptNet).

  Each a dict {'data': uint8 [n, H, W, 3], 'labels': [n] ints (global ids, shuffled order),
  'catname2label': {wnid: id}} (the last only with `catname2label`).

  Returns:
    split -> Expected; classes are spec's wnids, or "class_<id>" without catname2label.
  """
  directory = pathlib.Path(directory)
  rng = np.random.default_rng(seed)
  files = {"train": "miniImageNet_category_split_train_phase_train.pickle",
           "val": "miniImageNet_category_split_val.pickle",
           "test": "miniImageNet_category_split_test.pickle"}
  h, w, c = _shape(spec)
  out = {}
  for split in SPLITS:
    wnids, ids = spec.classes[split], _mini_global_ids(spec, split)
    labels = _labelled(rng, len(wnids), _count(spec))
    images = random_images(rng, len(labels), h, w, c)
    obj = {"data": images, "labels": [ids[k] for k in labels]}
    if catname2label:
      obj["catname2label"] = dict(zip(wnids, ids))
    _dump(obj, directory / files[split], py2)
    # Global ids increase in spec order, so the "class_<id>" order is the spec order too.
    names = tuple(wnids) if catname2label else tuple(f"class_{i}" for i in ids)
    out[split] = Expected(images, labels, names)
  return out


def write_mini_imagenet_cache(directory, spec: DatasetSpec, seed: int) -> dict[str, Expected]:
  """mini-imagenet-cache-{train,validation,test}.pkl: {'image_data', 'class_dict'}."""
  directory = pathlib.Path(directory)
  rng = np.random.default_rng(seed)
  h, w, c = _shape(spec)
  out = {}
  for split in SPLITS:
    wnids = spec.classes[split]
    labels = _labelled(rng, len(wnids), _count(spec))
    images = random_images(rng, len(labels), h, w, c)
    class_dict = {wnid: np.flatnonzero(labels == k).tolist() for k, wnid in enumerate(wnids)}
    name = "validation" if split == "val" else split
    _dump({"image_data": images, "class_dict": class_dict},
          directory / f"mini-imagenet-cache-{name}.pkl", py2=False)
    out[split] = Expected(images, labels, tuple(wnids))
  return out


def write_mini_imagenet_jpeg(directory, spec: DatasetSpec, seed: int, with_csv: bool = True,
                             size: tuple[int, int] = (84, 84),
                             distinct: int = 4) -> dict[str, Expected]:
  """images/<wnid><8 digits>.jpg, with the Ravi & Larochelle {split}.csv or without.

  JPEG is lossy: images are smooth and written at quality 100 without chroma subsampling, so
  decoded pixels are within a few levels of the expected ones (compare with a tolerance). When
  `size` (H, W) is not the spec's, the files have that size and the expected images are the
  originals resized with LANCZOS, as the reader does.

  Without CSVs the reader uses the packaged ones, which list 600 images per class: the files are
  written under those names, cycling through `distinct` encoded images to stay fast.

  Returns:
    split -> Expected (images is a list; labels follow the CSV row order).
  """
  directory = pathlib.Path(directory)
  rng = np.random.default_rng(seed)
  images_dir = directory / "images"
  images_dir.mkdir(parents=True, exist_ok=True)
  h, w, _ = _shape(spec)
  pool = smooth_images(rng, distinct, *size)
  encoded = [_jpeg_bytes(im) for im in pool]
  if (h, w) != tuple(size):
    expect = [np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.LANCZOS))
              for im in pool]
  else:
    expect = list(pool)
  # A file no CSV lists: the reader must ignore it.
  (images_dir / "n0000000000000000.jpg").write_bytes(encoded[0])
  out = {}
  for split in SPLITS:
    wnids = spec.classes[split]
    if with_csv:
      labels = _labelled(rng, len(wnids), _count(spec))
      # Non-contiguous 8-digit indices, as in the real file names.
      rows = [(f"{wnids[k]}{3 * i + 1:08d}.jpg", wnids[k]) for i, k in enumerate(labels)]
      with open(directory / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filename", "label"])
        writer.writerows(rows)
    else:
      keep = set(wnids)
      rows = [r for r in mini_imagenet_filenames(split) if r[1] in keep]
      labels = np.asarray([wnids.index(wnid) for _, wnid in rows], np.int64)
    for i, (name, _) in enumerate(rows):
      (images_dir / name).write_bytes(encoded[i % distinct])
    out[split] = Expected([expect[i % distinct] for i in range(len(rows))], labels, tuple(wnids))
  return out


# --- tieredImageNet ---------------------------------------------------------------------------


def tiered_human_name(wnid: str) -> str:
  """The fake human-readable name of a class (commas as in ImageNet's names)."""
  return f"thing {wnid[1:]}, alias"


# The forms in which the items of Ren et al.'s PNG pickles circulate (`write_tiered_ren`).
TIERED_PNG_FORMS = ("1d", "column", "bytes", "py2_bytes", "object_array", "object_column",
                    "imencode_pair")


def _png_container(pngs: list[bytes], form: str):
  """The pickled PNG list in `form`; see `write_tiered_ren`."""
  column = [np.frombuffer(b, np.uint8).reshape(-1, 1) for b in pngs]
  if form == "1d":
    return [np.frombuffer(b, np.uint8) for b in pngs]
  if form == "column":
    return column
  if form in ("bytes", "py2_bytes"):
    return list(pngs)
  if form == "imencode_pair":
    return [(True, c) for c in column]
  if form in ("object_array", "object_column"):
    out = np.empty(len(pngs) if form == "object_array" else (len(pngs), 1), object)
    for i, c in enumerate(column):
      out[i if form == "object_array" else (i, 0)] = c
    return out
  raise ValueError(form)


def write_tiered_ren(directory, spec: DatasetSpec, seed: int, bytes_keys: bool = True,
                     with_synsets: bool = True, png_form: str = "1d") -> dict[str, Expected]:
  """Ren et al.'s {split}_images_png.pkl + {split}_labels.pkl (+ synsets.txt, class_names.txt).

  'label_specific' indexes the classes in a shuffled order (Ren's os.listdir order),
  'label_specific_str' holds fake human names; 'label_general' is garbage, as the reader must
  not use it. `bytes_keys` writes bytes keys and bytes names (what loading with
  encoding="bytes" gives).

  `png_form` is how each PNG is held: "1d" a uint8 [n] array and "column" a uint8 [n, 1] array
  (what `cv2.imencode(...)[1]` returns, depending on the OpenCV version), "bytes" Python 3
  bytes, "py2_bytes" a Python 2 str (a Python 2 pickle), "object_array" a numpy object array
  [num_images] of [n, 1] arrays instead of a list, "object_column" the same as
  [num_images, 1], "imencode_pair" cv2.imencode's whole (True, [n, 1] array) return value.

  Returns:
    split -> Expected; classes are spec's wnids with synsets, else the human names in
    label_specific order.
  """
  directory = pathlib.Path(directory)
  rng = np.random.default_rng(seed)
  h, w, c = _shape(spec)
  key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
  out = {}
  for split in SPLITS:
    wnids = spec.classes[split]
    order = rng.permutation(len(wnids))  # label_specific index i is class wnids[order[i]]
    specific = _labelled(rng, len(wnids), _count(spec))
    images = random_images(rng, len(specific), h, w, c)
    pngs = _png_container([_png_bytes(im) for im in images], png_form)
    if png_form == "py2_bytes":
      dump_py2(pngs, directory / f"{split}_images_png.pkl")
    else:
      with open(directory / f"{split}_images_png.pkl", "wb") as f:
        pickle.dump(pngs, f, protocol=2)
    names = [tiered_human_name(wnids[j]) for j in order]
    labels = {key("label_specific"): specific.astype(np.int32),
              key("label_specific_str"): [key(n) for n in names],
              key("label_general"): np.full(len(specific), 7, np.int32),
              key("label_general_str"): {0: key("garbage")}}
    with open(directory / f"{split}_labels.pkl", "wb") as f:
      pickle.dump(labels, f, protocol=2)
    if with_synsets:
      expected = Expected(images, order[specific].astype(np.int64), tuple(wnids))
    else:
      expected = Expected(images, specific, tuple(names))
    out[split] = expected
  if with_synsets:
    all_wnids = [c for s in SPLITS for c in spec.classes[s]] + ["n99999999"]
    (directory / "synsets.txt").write_text("".join(f"{x}\n" for x in all_wnids))
    (directory / "class_names.txt").write_text(
        "".join(f"{tiered_human_name(x)}\n" for x in all_wnids))
  return out


def write_tiered_metaoptnet(directory, spec: DatasetSpec, seed: int,
                            id_offsets: tuple[int, int, int] = (0, 351, 448),
                            py2: bool = True) -> dict[str, Expected]:
  """MetaOptNet's {split}_images.npz ('images', BGR) + {split}_labels.pkl ({'labels': [...]}).

  Label ids are `id_offsets[split] + 2 * k` (sparse, disjoint for the default offsets).

  Returns:
    split -> Expected with RGB images and "class_<id>" names ordered by id.
  """
  directory = pathlib.Path(directory)
  rng = np.random.default_rng(seed)
  h, w, c = _shape(spec)
  out = {}
  for split, offset in zip(SPLITS, id_offsets):
    k = len(spec.classes[split])
    labels = _labelled(rng, k, _count(spec))
    images = random_images(rng, len(labels), h, w, c)
    ids = offset + 2 * np.arange(k)
    np.savez(directory / f"{split}_images.npz", images=images[..., ::-1])  # stored BGR
    _dump({"labels": [int(ids[j]) for j in labels]}, directory / f"{split}_labels.pkl", py2)
    out[split] = Expected(images, labels, tuple(f"class_{i}" for i in ids))
  return out


# --- CIFAR-100, CIFAR-FS, FC100 ---------------------------------------------------------------


@dataclasses.dataclass
class CifarArchive:
  """A fake cifar-100-python.tar.gz.

  Attributes:
    path: the archive.
    md5: its md5.
    images: uint8 [N, 32, 32, 3], the train member's images then the test member's.
    fine: [N] fine label ids.
    coarse: [N] coarse label ids.
  """

  path: pathlib.Path
  md5: str
  images: np.ndarray
  fine: np.ndarray
  coarse: np.ndarray

  def expected(self, spec: DatasetSpec) -> dict[str, Expected]:
    """What reading the archive for `spec` (CIFAR-FS or FC100 classes) must give."""
    names = cifar100_fine_names()
    out = {}
    for split in SPLITS:
      ids = [names.index(c) for c in spec.classes[split]]
      keep = np.flatnonzero(np.isin(self.fine, ids))
      labels = np.asarray([ids.index(i) for i in self.fine[keep]], np.int64)
      out[split] = Expected(self.images[keep], labels, tuple(spec.classes[split]))
    return out


def _superclass_of() -> dict[str, str]:
  return {fine: sup for s in SPLITS for sup, fine in fc100_classes(s)}


def write_cifar100_archive(directory, seed: int, images_per_class_train: int = 2,
                           images_per_class_test: int = 1,
                           wrong_coarse: bool = False) -> CifarArchive:
  """A fake cifar-100-python.tar.gz with all 100 fine and 20 coarse classes.

  Members cifar-100-python/{train,test,meta} are Python 2 pickles with the real keys; data rows
  are 1024 R, 1024 G, 1024 B values; coarse labels agree with fc100_classes (except one image
  with `wrong_coarse`).

  Returns:
    The archive, its md5 and its contents (see `CifarArchive.expected`).
  """
  directory = pathlib.Path(directory)
  rng = np.random.default_rng(seed)
  fine_names, coarse_names = cifar100_fine_names(), cifar100_coarse_names()
  sup = _superclass_of()
  coarse_of = np.asarray([coarse_names.index(sup[n]) for n in fine_names])
  members, parts = {}, []
  for member, per_class in (("train", images_per_class_train), ("test", images_per_class_test)):
    fine = _labelled(rng, len(fine_names), per_class)
    coarse = coarse_of[fine].copy()
    if wrong_coarse and member == "test":
      coarse[0] = (coarse[0] + 1) % len(coarse_names)
    images = random_images(rng, len(fine), 32, 32)
    rows = images.transpose(0, 3, 1, 2).reshape(len(fine), 3072)
    members[member] = {"filenames": [f"img_{i}.png" for i in range(len(fine))],
                       "batch_label": f"{member} batch",
                       "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(),
                       "data": rows}
    parts.append((images, fine, coarse))
  members["meta"] = {"fine_label_names": list(fine_names),
                     "coarse_label_names": list(coarse_names)}
  path = directory / "cifar-100-python.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for member, obj in members.items():
      buf = io.BytesIO()
      Py2Pickler(buf).dump(obj)
      info = tarfile.TarInfo(f"cifar-100-python/{member}")
      info.size = len(buf.getvalue())
      tar.addfile(info, io.BytesIO(buf.getvalue()))
  md5 = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
  return CifarArchive(path, md5, np.concatenate([p[0] for p in parts]),
                      np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))


def write_cifar_metaoptnet(directory, name: str, spec: DatasetSpec, seed: int,
                           fine_ids: bool = True, dtype=np.uint8) -> dict[str, Expected]:
  """MetaOptNet's {name}_{train,val,test}.pickle (name "CIFAR_FS" or "FC100"), Python 2 pickles.

  Each a dict {'data': [n, 32, 32, 3] of `dtype`, 'labels': [n] ints}. Labels are CIFAR-100 fine
  ids, or with `fine_ids=False` sparse ids that are not (1000 + 3 * k, disjoint across splits).

  Returns:
    split -> Expected; classes are spec's fine names, or "class_<id>" without fine ids.
  """
  directory = pathlib.Path(directory)
  rng = np.random.default_rng(seed)
  fine = cifar100_fine_names()
  h, w, c = _shape(spec, (32, 32, 3))
  out, next_id = {}, 1000
  for split in SPLITS:
    classes = spec.classes[split]
    labels = _labelled(rng, len(classes), _count(spec))
    images = random_images(rng, len(labels), h, w, c)
    if fine_ids:
      ids = [fine.index(x) for x in classes]
      names = tuple(classes)
    else:
      ids = [next_id + 3 * k for k in range(len(classes))]
      next_id += 3 * len(classes)
      names = tuple(f"class_{i}" for i in ids)
    dump_py2({"data": images.astype(dtype), "labels": [ids[k] for k in labels]},
             directory / f"{name}_{split}.pickle")
    out[split] = Expected(images, labels, names)
  return out


# --- image folder -----------------------------------------------------------------------------


def write_image_folder(directory, classes_per_split: int | dict[str, int], images_per_class: int,
                       seed: int, size: tuple[int, int] = (8, 8)) -> dict[str, Expected]:
  """root/{train,val,test}/<class>/<images> of PNGs of `size` (H, W), lossless.

  Some files have upper-case suffixes (.PNG); a text file and a hidden file in each class folder
  must be ignored. Class folders are created in an order that differs from the sorted one.

  Returns:
    split -> Expected in the reader's order (classes sorted, files sorted); read with
    image_size=size for exact pixels.
  """
  directory = pathlib.Path(directory)
  rng = np.random.default_rng(seed)
  if isinstance(classes_per_split, int):
    classes_per_split = {s: classes_per_split for s in SPLITS}
  out = {}
  for split in SPLITS:
    created = [f"{split}_{chr(ord('z') - k)}" for k in range(classes_per_split[split])]
    images, labels = [], []
    for label, cls in enumerate(sorted(created)):
      folder = directory / split / cls
      folder.mkdir(parents=True, exist_ok=True)
      (folder / "notes.txt").write_text("not an image")
      (folder / ".hidden.png").write_bytes(b"not an image either")
      batch = random_images(rng, images_per_class, *size)
      for i, image in enumerate(batch):
        suffix = ".PNG" if i % 2 else ".png"
        (folder / f"img_{i:03d}{suffix}").write_bytes(_png_bytes(image))
      images += list(batch)
      labels += [label] * images_per_class
    out[split] = Expected(np.stack(images), np.asarray(labels, np.int64), tuple(sorted(created)))
  return out
