"""What each benchmark must contain: its standard class splits and image counts.

The class lists ship inside the package (`metadiff_jax/data/splits/`, sources in its
`SOURCES.md`). A `DatasetSpec` is what a builder checks the user's files against. Tests and
users who want a subset (a few classes, a few images) pass `spec.subset(...)`; the checks are the
same code either way.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
from importlib import resources

SPLITS = ("train", "val", "test")


def _read_text(dataset: str, filename: str) -> str:
  path = resources.files("metadiff_jax.data").joinpath("splits").joinpath(dataset).joinpath(filename)
  data = path.read_bytes()
  if filename.endswith(".gz"):
    data = gzip.decompress(data)
  return data.decode("ascii")


def _lines(dataset: str, filename: str) -> tuple[str, ...]:
  return tuple(line for line in _read_text(dataset, filename).splitlines() if line)


def mini_imagenet_wnids(split: str) -> tuple[str, ...]:
  """The sorted ImageNet wnids of a miniImageNet split (Ravi & Larochelle): 64 / 16 / 20."""
  return _lines("mini_imagenet", f"{_check_split(split)}.txt")


def mini_imagenet_filenames(split: str) -> tuple[tuple[str, str], ...]:
  """(filename, wnid) rows of the Ravi & Larochelle CSV of a split, 600 per class."""
  rows = csv.reader(io.StringIO(_read_text("mini_imagenet", f"{_check_split(split)}.csv.gz")))
  next(rows)  # header: filename,label
  return tuple((r[0], r[1]) for r in rows)


def tiered_imagenet_classes(split: str) -> tuple[tuple[str, str], ...]:
  """(category_wnid, class_wnid) rows of a tieredImageNet split: 351 / 97 / 160 classes."""
  rows = csv.reader(io.StringIO(_read_text("tiered_imagenet", f"{_check_split(split)}.csv")))
  next(rows)  # header: category_wnid,class_wnid
  return tuple((r[0], r[1]) for r in rows)


def cifar_fs_classes(split: str) -> tuple[str, ...]:
  """The sorted CIFAR-100 fine names of a CIFAR-FS split (Bertinetto et al.): 64 / 16 / 20."""
  return _lines("cifar_fs", f"{_check_split(split)}.txt")


def fc100_classes(split: str) -> tuple[tuple[str, str], ...]:
  """(superclass, fine_class) rows of an FC100 split (Oreshkin et al.): 60 / 20 / 20."""
  return tuple(tuple(line.split(",")) for line in _lines("fc100", f"{_check_split(split)}.txt"))


def cifar100_fine_names() -> tuple[str, ...]:
  """The 100 CIFAR-100 fine label names in label order (alphabetical: apple = 0 ... worm = 99)."""
  return tuple(sorted(c for s in SPLITS for c in cifar_fs_classes(s)))


def cifar100_coarse_names() -> tuple[str, ...]:
  """The 20 CIFAR-100 superclass names in label order (alphabetical)."""
  return tuple(sorted({sup for s in SPLITS for sup, _ in fc100_classes(s)}))


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return split


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a built dataset must hold.

  Attributes:
    name: the dataset's name, e.g. "mini_imagenet".
    classes: split -> the class identifiers that split must hold (wnids or CIFAR names), in
      the order labels are assigned (label i of a split is classes[split][i]).
    images_per_class: the exact number of images each class must have, or None for any
      positive number.
    image_shape: (H, W, C) every image must have, or None for any.
  """

  name: str
  classes: dict[str, tuple[str, ...]]
  images_per_class: int | None
  image_shape: tuple[int, int, int] | None

  def num_classes(self, split: str) -> int:
    return len(self.classes[split])

  def subset(self, classes_per_split: int | dict[str, int] | None = None,
             images_per_class: int | None = None) -> DatasetSpec:
    """The first classes of each split and a smaller image count (tests, quick looks).

    Args:
      classes_per_split: how many classes of each split to keep (an int for all splits, or a
        dict per split); None keeps them all.
      images_per_class: the image count to expect instead of the standard one.

    Returns:
      A DatasetSpec that the same builders check against.
    """
    if classes_per_split is None:
      classes = dict(self.classes)
    else:
      if isinstance(classes_per_split, int):
        classes_per_split = {s: classes_per_split for s in self.classes}
      classes = {s: self.classes[s][:classes_per_split[s]] for s in self.classes}
    return dataclasses.replace(self, classes=classes, images_per_class=images_per_class)


def standard_spec(name: str) -> DatasetSpec:
  """The standard spec of a benchmark: "mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100"."""
  if name == "mini_imagenet":
    return DatasetSpec(name, {s: mini_imagenet_wnids(s) for s in SPLITS}, 600, (84, 84, 3))
  if name == "tiered_imagenet":
    # Image counts per class vary, so only the classes and the image shape are fixed.
    return DatasetSpec(name, {s: tuple(c for _, c in tiered_imagenet_classes(s)) for s in SPLITS},
                       None, (84, 84, 3))
  if name == "cifar_fs":
    return DatasetSpec(name, {s: cifar_fs_classes(s) for s in SPLITS}, 600, (32, 32, 3))
  if name == "fc100":
    return DatasetSpec(name, {s: tuple(c for _, c in fc100_classes(s)) for s in SPLITS}, 600,
                       (32, 32, 3))
  raise ValueError(f"no standard spec for {name!r}; known: mini_imagenet, tiered_imagenet, "
                   "cifar_fs, fc100")


# Per-dataset pretraining augmentations: the defaults of a config's `data.augment` section
# (`config_lib`), read by `metadiff_jax.data.augment`. Padding 8 for 84-pixel and 4 for 32-pixel
# images, flips and jitter 0.4 as in MetaOptNet's and RFS's pretraining; glyphs are only shifted
# and jittered in brightness and contrast, never flipped.
AUGMENTATIONS = {
    "mini_imagenet": dict(crop_padding=8, flip=True, brightness=0.4, contrast=0.4,
                          saturation=0.4),
    "tiered_imagenet": dict(crop_padding=8, flip=True, brightness=0.4, contrast=0.4,
                            saturation=0.4),
    "cifar_fs": dict(crop_padding=4, flip=True, brightness=0.4, contrast=0.4, saturation=0.4),
    "fc100": dict(crop_padding=4, flip=True, brightness=0.4, contrast=0.4, saturation=0.4),
    "image_folder": dict(crop_padding=8, flip=True, brightness=0.4, contrast=0.4,
                         saturation=0.4),
    "glyphs": dict(crop_padding=2, flip=False, brightness=0.4, contrast=0.4, saturation=0.0),
    # Flips as for natural images (a mirror keeps a texture's frequencies, sharpness and colours,
    # though not its orientations); colour is part of a class, so its jitter stays modest.
    "textures": dict(crop_padding=4, flip=True, brightness=0.2, contrast=0.2, saturation=0.2),
}
