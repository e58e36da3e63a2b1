"""Unpickling the users' pickles safely, and reading what Python 2 wrote.

Pickles are only ever read from the paths that the user's `manual_dir` names (or the CIFAR-100
archive the caller passes), with an unpickler that only builds the plain containers and numpy
arrays these formats hold.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from metadiff_jax.data.formats.base import Where, short_error

# The globals the pickles of these formats need: numpy arrays and scalars (under numpy 1 and
# numpy 2 module names), Python 3's protocol-2 bytes trick, and plain containers. Anything else
# is refused, so a hostile pickle cannot run code.
_BUILTIN_NAMES = ("set", "frozenset", "list", "dict", "tuple", "bytearray", "bytes", "int",
                  "float", "complex", "str", "object", "slice", "range")
_PICKLE_GLOBALS = frozenset(
    {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
     for n in ("_reconstruct", "scalar")}
    | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
       ("collections", "OrderedDict"), ("collections", "defaultdict"),
       ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")}
    | {(m, n) for m in ("builtins", "__builtin__") for n in _BUILTIN_NAMES})


class _SafeUnpickler(pickle.Unpickler):
  """An unpickler that builds only `_PICKLE_GLOBALS`."""

  def find_class(self, module: str, name: str):
    if (module, name) not in _PICKLE_GLOBALS:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}, which these datasets "
                                   "never hold")
    # Old pickles name numpy 1's modules; numpy 2 keeps them only as deprecated aliases.
    if module.startswith("numpy.core.") and hasattr(np, "_core"):
      module = "numpy._core." + module[len("numpy.core."):]
    return super().find_class(module, name)


def unpickle(f: io.BufferedIOBase, where: Where, encodings: Sequence[str]) -> Any:
  """Unpickles `f`, trying each of `encodings` in turn (for Python 2 pickles)."""
  last: BaseException | None = None
  for encoding in encodings:
    try:
      f.seek(0)
      return _SafeUnpickler(f, encoding=encoding).load()
    except Exception as e:  # noqa: BLE001  (corrupt pickles raise almost anything)
      last = e
  raise where.error(f"cannot be unpickled ({short_error(last)}); the file is truncated, corrupt "
                    "or not in this format")


def load_pickle(path: pathlib.Path, where: Where, encodings: Sequence[str]) -> Any:
  """Unpickles the file at `path` (see `unpickle`); a missing or unreadable file is named."""
  if not path.is_file():
    raise where.error("missing")
  try:
    with open(path, "rb") as f:
      return unpickle(f, where, encodings)
  except OSError as e:
    raise where.error(f"cannot be read ({short_error(e)})") from None


# Python 2 pickles: plain load first (Python 3 pickles), then latin1 (numpy data as py2 str).
PY2 = ("ASCII", "latin1")


def to_str(x: Any) -> Any:
  """Bytes (from Python 2 pickles loaded with encoding="bytes") as str; anything else as is."""
  if isinstance(x, (bytes, bytearray)):
    try:
      return bytes(x).decode("utf-8")
    except UnicodeDecodeError:
      return bytes(x).decode("latin1")
  return x


def as_dict(obj: Any, where: Where, keys: Iterable[str]) -> dict[str, Any]:
  """`obj` as a dict with str keys, checked to hold `keys`."""
  if not isinstance(obj, Mapping):
    raise where.error(f"holds a pickled {type(obj).__name__}, not a dict")
  out = {to_str(k): v for k, v in obj.items()}
  missing = [k for k in keys if k not in out]
  if missing:
    raise where.error(f"has no key {missing[0]!r} (its keys: "
                      f"{', '.join(sorted(map(str, out))[:8])})")
  return out
