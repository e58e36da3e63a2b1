"""Decoding one image file, or the encoded bytes of one, to uint8 [H, W, C]."""

from __future__ import annotations

import io

import numpy as np

from metadiff_jax.data.formats.base import PathLike, Where, short_error


def decode_image(data: bytes | PathLike, where: Where, what: str,
                 size: tuple[int, int] | None, mode: str,
                 shape: tuple[int, ...] | None) -> np.ndarray:
  """Decodes one image file or encoded bytes to uint8 [H, W, C].

  Args:
    data: a path, or the encoded bytes.
    where: the file, for messages.
    what: which image, for messages ("" for a whole file).
    size: (H, W) to resize to with LANCZOS where it differs; None keeps the size.
    mode: "RGB" or "L" ("L" gives [H, W, 1]).
    shape: (H, W, C) the result must have, or None.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top  (imported where images are read)

  try:
    with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as im:
      im = im.convert(mode)
      if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
      arr = np.asarray(im, dtype=np.uint8)
  except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, ...)
    raise where.error(f"{what}cannot be decoded as an image ({short_error(e)})") from None
  if arr.ndim == 2:
    arr = arr[:, :, None]
  if shape is not None and arr.shape != tuple(shape):
    raise where.error(f"{what}has shape {list(arr.shape)}, not {list(shape)}")
  return arr


def decode_file(path: str, where: Where, size, mode, shape) -> np.ndarray:
  """Decodes the image file at `path` (see `decode_image`); messages name that file."""
  return decode_image(path, where.at(path), "", size, mode, shape)


def image_mode(shape: tuple[int, ...] | None) -> str:
  """The PIL mode giving images of `shape` (H, W, C): "L" for one channel, else "RGB"."""
  return "L" if shape is not None and shape[-1] == 1 else "RGB"
