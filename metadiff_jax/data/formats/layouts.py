"""The on-disk layouts in which a dataset circulates, and telling which one a folder holds.

Each reader module declares its datasets' layouts (`LAYOUTS`, in order of preference); `detect`
finds the one a user's folder holds, and `read` hands the folder to that layout's reader.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

from metadiff_jax.data.errors import DataError
from metadiff_jax.data.formats.base import PathLike, RawSplit, Where
from metadiff_jax.data.spec import DatasetSpec

METAOPTNET_SOURCE = "the MetaOptNet repository's Google Drive link (kjunelee/MetaOptNet README)"


@dataclasses.dataclass(frozen=True)
class Layout:
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

  def where(self, path: PathLike) -> Where:
    """The file `path` of this layout, for messages."""
    return Where(os.fspath(path), self.expected, self.source)


def describe(layouts: Sequence[Layout]) -> str:
  """Every layout with what it holds and where it comes from, for messages."""
  return " | ".join(f"{l.name}: {l.expected} (from {l.source})" for l in layouts)


def detect(dataset: str, layouts: Sequence[Layout], manual_dir: PathLike) -> Layout:
  """Which of `dataset`'s `layouts` (in order of preference) `manual_dir` holds.

  A layout whose files are all present wins. Otherwise the first layout with some of its
  distinctive files is returned, so that its reader names the missing file.

  Raises:
    DataError: the directory is missing or holds no known layout; the message lists them all.
  """
  root = pathlib.Path(manual_dir)
  if not root.is_dir():
    raise DataError(f"{root}: no such directory; expected one of the {dataset} layouts: "
                    f"{describe(layouts)}")
  for layout in layouts:
    if all((root / f).exists() for f in layout.files):
      return layout
  for layout in layouts:
    if any((root / f).exists() for f in layout.markers):
      return layout
  raise DataError(f"{root}: no known {dataset} layout found; expected one of: "
                  f"{describe(layouts)}")


Reader = Callable[[pathlib.Path, DatasetSpec, Layout], dict[str, RawSplit]]


def read(dataset: str, layouts: Sequence[Layout], readers: Mapping[str, Reader],
         manual_dir: PathLike, spec: DatasetSpec) -> dict[str, RawSplit]:
  """Reads `manual_dir` with the reader of the layout it holds (`detect`)."""
  root = pathlib.Path(manual_dir)
  layout = detect(dataset, layouts, root)
  return readers[layout.name](root, spec, layout)
