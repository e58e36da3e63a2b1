"""Embedded few-shot sets: generated on the spot, so they need no download.

A set is drawn by a `Recipe` (the glyphs of `glyphs.py`, the textures of `textures.py`): the
recipe says what a class is and how to draw images of it; everything else is shared here: the
class splits, the random streams, the order of drawing, the set's digest, a mosaic to look at,
and the command that builds and times the default set
(`python -m metadiff_jax.data.glyphs --grid glyphs.png`).

The same arguments give byte-identical arrays: the seed spawns one random stream per purpose
(classes, splits, images), so changing `images_per_class` leaves the classes and splits alone.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import hashlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from metadiff_jax.data.errors import DataError
from metadiff_jax.data.spec import SPLITS

SPLIT_FRACTIONS = (0.64, 0.16, 0.20)


@dataclasses.dataclass(frozen=True)
class EmbeddedSet:
  """A generated set: images grouped by class, class c's images at labels == c.

  Attributes:
    images: [n, H, W, C] uint8.
    labels: [n] int64 global class index in [0, num_classes).
    class_names: [num_classes] one name per class.
    splits: "train" / "val" / "test" -> sorted global class indices; disjoint, ~64 / 16 / 20 %.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  splits: dict[str, np.ndarray]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def split_classes(num_classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Classes 0..num_classes-1 dealt into round(0.64 n) / round(0.16 n) / the rest at random.

  Returns:
    "train" / "val" / "test" -> sorted int64 class indices.
  """
  n_train = round(SPLIT_FRACTIONS[0] * num_classes)
  n_val = round(SPLIT_FRACTIONS[1] * num_classes)
  order = rng.permutation(num_classes)
  parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
  return {name: np.sort(part).astype(np.int64) for name, part in zip(SPLITS, parts)}


class Recipe(abc.ABC):
  """How one embedded set draws its classes and their images.

  Attributes:
    name: the dataset's name ("glyphs"), in progress lines.
    set_type: the `EmbeddedSet` subclass `generate` returns.
    channels: C of the images.
    default_num_classes: the default set's number of classes.
    min_image_size: the smallest image side the drawing supports, px.
  """

  name: str
  set_type: type[EmbeddedSet] = EmbeddedSet
  channels: int
  default_num_classes: int
  min_image_size: int

  def max_num_classes(self) -> int | None:
    """The most classes a set may have; None where there is no limit."""
    return None

  def prepare(self) -> str | None:
    """Does the work shared by every set before any is drawn; returns a line saying what."""
    return None

  @abc.abstractmethod
  def draw_classes(self, num_classes: int, rng: np.random.Generator) -> Sequence[Any]:
    """The `num_classes` classes of a set, each in whatever form `draw_images` takes."""

  @abc.abstractmethod
  def class_name(self, label: int, cls: Any) -> str:
    """The name of class `cls`, the set's class `label`."""

  @abc.abstractmethod
  def draw_images(self, cls: Any, count: int, image_size: int,
                  rng: np.random.Generator) -> np.ndarray:
    """`count` images of class `cls`: [count, image_size, image_size, channels] uint8."""

  def generate(self, num_classes: int | None = None, images_per_class: int = 20,
               image_size: int = 32, seed: int = 0, progress: bool = False) -> EmbeddedSet:
    """Builds a set; the same arguments give byte-identical arrays.

    Args:
      num_classes: classes to draw; None for `default_num_classes`.
      images_per_class: images of each class.
      image_size: side of each square image, px.
      seed: draws the classes, their splits, and every image.
      progress: print a progress line to stderr.

    Returns:
      A `set_type`: images [num_classes * images_per_class, image_size, image_size, channels]
      uint8 grouped by class, splits of round(0.64 n) / round(0.16 n) / the rest classes.
    """
    num_classes = self.default_num_classes if num_classes is None else num_classes
    most = self.max_num_classes()
    if most is not None and not 1 <= num_classes <= most:
      raise DataError(f"num_classes must be in [1, {most}], got {num_classes}")
    if num_classes < 1:
      raise DataError(f"num_classes must be positive, got {num_classes}")
    if images_per_class < 1:
      raise DataError(f"images_per_class must be positive, got {images_per_class}")
    if image_size < self.min_image_size:
      raise DataError(f"image_size must be at least {self.min_image_size}, got {image_size}")
    # One stream per purpose, so changing images_per_class leaves the classes and splits alone.
    class_rng, split_rng, image_rng = (np.random.default_rng(s)
                                       for s in np.random.SeedSequence(seed).spawn(3))
    classes = self.draw_classes(num_classes, class_rng)
    splits = split_classes(num_classes, split_rng)

    images = np.empty((num_classes * images_per_class, image_size, image_size, self.channels),
                      np.uint8)
    every = max(1, self.default_num_classes // 10)  # a progress line per tenth of the default
    for label, cls in enumerate(classes):
      start = label * images_per_class
      images[start:start + images_per_class] = self.draw_images(cls, images_per_class,
                                                                image_size, image_rng)
      if progress and ((label + 1) % every == 0 or label + 1 == num_classes):
        print(f"\r{self.name}: {label + 1}/{num_classes} classes", end="", file=sys.stderr,
              flush=True)
    if progress:
      print(file=sys.stderr)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), images_per_class)
    names = tuple(self.class_name(label, cls) for label, cls in enumerate(classes))
    return self.set_type(images=images, labels=labels, class_names=names, splits=splits)


def fingerprint(embedded_set: EmbeddedSet) -> str:
  """A short hex digest of a set's images, labels, class names and splits, for cache keys."""
  digest = hashlib.sha256()
  digest.update(repr(embedded_set.images.shape).encode())
  digest.update(np.ascontiguousarray(embedded_set.images, np.uint8).tobytes())
  digest.update(np.ascontiguousarray(embedded_set.labels, "<i8").tobytes())
  digest.update("\n".join(embedded_set.class_names).encode())
  for name in SPLITS:
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(embedded_set.splits[name], "<i8").tobytes())
  return digest.hexdigest()[:16]


def grid(embedded_set: EmbeddedSet, num_classes: int = 40, images_per_class: int = 8,
         zoom: int = 2) -> np.ndarray:
  """A mosaic for looking at a set: evenly spaced classes in two columns of rows.

  Args:
    embedded_set: the set.
    num_classes: classes shown, spread evenly over the class indices.
    images_per_class: the first images of each class, left to right.
    zoom: nearest-neighbour magnification.

  Returns:
    [height, width] uint8 for one channel ([height, width, C] for C), grey lines between
    images and a wider gap between the two columns.
  """
  size, channels = embedded_set.images.shape[1], embedded_set.images.shape[-1]
  per_class = len(embedded_set.labels) // embedded_set.num_classes
  shown = np.linspace(0, embedded_set.num_classes - 1, num_classes).round().astype(int)
  rows = (num_classes + 1) // 2
  cell = size + 2
  half = images_per_class * cell
  mosaic = np.full((rows * cell, 2 * half + 3 * cell // 2, channels), 64, np.uint8)
  for n, label in enumerate(shown):
    top, left = (n % rows) * cell + 1, (n // rows) * (half + 3 * cell // 2) + 1
    for k in range(min(images_per_class, per_class)):
      image = embedded_set.images[label * per_class + k]
      mosaic[top:top + size, left + k * cell:left + k * cell + size] = image
  mosaic = mosaic[..., 0] if channels == 1 else mosaic
  return mosaic.repeat(zoom, 0).repeat(zoom, 1)


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> None:
  """Builds the default set of `recipe`, prints its time, digest and splits, writes a mosaic."""
  parser = argparse.ArgumentParser(description=f"Build the default {recipe.name} set; time it.")
  parser.add_argument("--grid", help="write a PNG of 40 classes x 8 images here")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  prepared = recipe.prepare()
  middle = time.perf_counter()
  embedded_set = recipe.generate(progress=True)
  end = time.perf_counter()
  head = "" if prepared is None else f"{prepared} in {middle - start:.1f} s; "
  print(f"{head}{len(embedded_set.labels)} images of {embedded_set.num_classes} classes in "
        f"{end - middle:.1f} s; fingerprint {fingerprint(embedded_set)}")
  print({name: len(classes) for name, classes in embedded_set.splits.items()})
  if args.grid:
    from PIL import Image  # pylint: disable=g-import-not-at-top  (only to write the PNG)
    mosaic = Image.fromarray(grid(embedded_set))
    if embedded_set.images.shape[-1] == 3:
      # An adaptive 256-colour palette: a noisy RGB mosaic is 2.3x smaller than in true colour.
      mosaic = mosaic.quantize(256)
    mosaic.save(args.grid, optimize=True)
