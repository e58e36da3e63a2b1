"""Command line: build a dataset, or inspect a built one.

  python -m metadiff_jax.data build glyphs --data_dir ~/tensorflow_datasets
  python -m metadiff_jax.data build textures --num_classes 200 --image_size 32
  python -m metadiff_jax.data build mini_imagenet --data_dir D --manual_dir M
  python -m metadiff_jax.data build image_folder --manual_dir ROOT --config flowers --image_size 84
  python -m metadiff_jax.data inspect glyphs --data_dir D --split test --out episode.png
  python -m metadiff_jax.data export glyphs --out glyph_folder   # as an image folder

A bad input prints one line starting with "error:" and exits with status 2; nothing already
built is touched.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from metadiff_jax import errors
from metadiff_jax.data import builders, episodes, load
from metadiff_jax.data.errors import DataError
from metadiff_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(prog="python -m metadiff_jax.data", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  names = list(builders.BUILDERS)

  b = sub.add_parser("build", help="write a dataset as array_record files")
  b.add_argument("name", choices=names)
  b.add_argument("--data_dir", default=load.DEFAULT_DATA_DIR)
  b.add_argument("--manual_dir", default=None,
                 help="directory holding the dataset's files (image_folder: the root)")
  b.add_argument("--config", default=None,
                 help="builder config name (glyphs, textures, image_folder); default "
                      "'default'")
  b.add_argument("--image_size", type=int, default=None,
                 help="glyphs, textures: side in pixels (default 32); image_folder: resize to "
                      "this square (default 84)")
  b.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image_folder only")
  b.add_argument("--num_classes", type=int, default=None, help="glyphs, textures only")
  b.add_argument("--images_per_class", type=int, default=None,
                 help="glyphs, textures only")
  b.add_argument("--seed", type=int, default=None, help="glyphs, textures only")

  e = sub.add_parser("export", help="write a built dataset as an image folder of PNGs "
                     "(OUT/{train,val,test}/<class>/*.png), the layout of image_folder")
  e.add_argument("name", choices=names)
  e.add_argument("--data_dir", default=load.DEFAULT_DATA_DIR)
  e.add_argument("--config", default=None)
  e.add_argument("--out", required=True, help="a new folder")

  i = sub.add_parser("inspect", help="print counts and write a PNG of one episode")
  i.add_argument("name", choices=names)
  i.add_argument("--data_dir", default=load.DEFAULT_DATA_DIR)
  i.add_argument("--config", default=None)
  i.add_argument("--split", default="test", choices=("train", "val", "test"))
  i.add_argument("--ways", type=int, default=5)
  i.add_argument("--shots", type=int, default=1)
  i.add_argument("--queries", type=int, default=5)
  i.add_argument("--seed", type=int, default=0)
  i.add_argument("--episode", type=int, default=0, help="episode index")
  i.add_argument("--out", default=None, help="PNG path (default: <name>_<split>_episode.png)")
  return p


def _builder_config(args):
  if builders.BUILDERS[args.name].CONFIG_CLASS is builders.EmbeddedConfig:
    changed = {k: getattr(args, k) for k in ("image_size", "num_classes", "images_per_class",
                                             "seed") if getattr(args, k) is not None}
    if not changed and args.config in (None, "default"):
      return None
    name = args.config or "_".join(f"{k}{v}" for k, v in sorted(changed.items()))
    return builders.EmbeddedConfig(name=name, **changed)
  if args.name == "image_folder":
    size = args.image_size or 84
    return builders.ImageFolderConfig(name=args.config or "default", image_size=(size, size),
                                      channels=args.channels)
  for flag in ("config", "image_size", "num_classes", "images_per_class", "seed"):
    if getattr(args, flag) is not None:
      raise DataError(f"--{flag} does not apply to {args.name}")
  return None


def build(args) -> int:
  builder = builders.make_builder(args.name, args.data_dir, args.manual_dir,
                                  config=_builder_config(args))
  start = time.perf_counter()
  kept = []

  def report(line):
    print(line, flush=True)
    kept.append(line.startswith("kept"))

  path = builders.build(builder, report=report)
  # Read back from disk: a rebuild replaced what `builder` saw when it was made.
  built = tfds.builder_from_directory(path)
  counts = {s: built.info.splits[s].num_examples for s in builders.SPLITS}
  classes = built.info.metadata.get("num_classes", {})
  if kept and kept[-1]:
    print(f"{args.name} already built: {path}")
  else:
    print(f"built {args.name} in {time.perf_counter() - start:.1f} s: {path}")
  for s in builders.SPLITS:
    print(f"  {s:5s}: {classes.get(s, '?')} classes, {counts[s]} images")
  stats = built.info.metadata.get("normalization")
  if stats:
    print(f"  train pixel mean {_rounded(stats['mean'])}, std {_rounded(stats['std'])}")
  return 0


def _rounded(values) -> str:
  return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def export(args) -> int:
  """Writes a built dataset as an image folder: OUT/{train,val,test}/<class>/<index>.png."""
  from PIL import Image
  ref = load.DatasetRef(args.name, args.data_dir, args.config)
  out = os.path.expanduser(args.out)
  if os.path.exists(out) and os.listdir(out):
    raise DataError(f"{out} exists and is not empty; give a new folder as --out")
  for split in builders.SPLITS:
    data = load.load_split(ref, split, progress=False)
    names = [_folder_name(n, i) for i, n in enumerate(data.class_names)]
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
      folder = os.path.join(out, split, names[label])
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
          os.path.join(folder, f"{i:06d}.png"))
    print(f"  {split:5s}: {data.num_classes} classes, {len(data.labels)} images")
  print(f"exported {args.name} to {out}")
  return 0


def _folder_name(name: str, index: int) -> str:
  """A class name safe as one folder name, prefixed with its index to keep names distinct."""
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
  return f"{index:04d}_{safe}"[:80]


def inspect(args) -> int:
  ref = load.DatasetRef(args.name, args.data_dir, args.config)
  print(f"{args.name}: {load.dataset_dir(ref)} (fingerprint {load.fingerprint(ref)})")
  for s in ("train", "val", "test"):
    source = load.open_source(ref, s)
    names = load.class_names(ref, s)
    print(f"  {s:5s}: {len(names)} classes, {len(source)} images")
  data = load.load_split(ref, args.split, progress=False)
  counts = np.bincount(data.labels, minlength=data.num_classes)
  print(f"  {args.split} images per class: min {counts.min()}, max {counts.max()}; "
        f"image shape {data.images.shape[1:]}")
  sampler = episodes.EpisodeSampler(data.labels, args.ways, args.shots, args.queries,
                                    args.seed, args.split)
  ep = sampler.episode(args.episode)
  out = args.out or f"{args.name}_{args.split}_episode.png"
  episode_grid(data, ep, out, title=f"{args.name}/{args.split} episode {args.episode} "
               f"(seed {args.seed}): {args.ways}-way {args.shots}-shot, {args.queries} queries")
  print(f"  episode {args.episode}: classes "
        f"{[data.class_names[c] for c in ep.classes[0]]}; grid written to {out}")
  return 0


def episode_grid(data: load.SplitArrays, ep: episodes.Episodes, path: str, title: str = ""):
  """A PNG of one episode: a row per class, support images then query images."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  support, query = ep.support[0], ep.query[0]
  ways = ep.classes.shape[1]
  shots, queries = len(support) // ways, len(query) // ways
  cols = shots + queries
  fig, axes = plt.subplots(ways, cols, figsize=(1.2 * cols + 1.5, 1.2 * ways + 0.6),
                           squeeze=False)
  for row in range(ways):
    cells = list(support[row * shots:(row + 1) * shots]) + list(
        query[row * queries:(row + 1) * queries])
    for col, idx in enumerate(cells):
      ax = axes[row, col]
      image = data.images[idx]
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
                vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title("support" if col < shots else "query", fontsize=8,
                     color="tab:blue" if col < shots else "tab:orange")
      if col == 0:
        name = data.class_names[ep.classes[0, row]]
        ax.set_ylabel(name if len(name) <= 18 else name[:16] + "…", fontsize=7)
      for spine in ax.spines.values():
        spine.set_edgecolor("tab:blue" if col < shots else "tab:orange")
        spine.set_linewidth(2)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _not_tfds_chatter(record: logging.LogRecord) -> bool:
  """False for TFDS's warnings ("Using custom data configuration: ..." on every build of a
  config); its errors pass."""
  return record.levelno >= logging.ERROR or "/tensorflow_datasets/" not in record.pathname


def main(argv=None) -> int:
  """The command line; returns the exit status (2 for a problem the user can fix)."""
  args = _parser().parse_args(argv)
  log = logging.StreamHandler()
  log.addFilter(_not_tfds_chatter)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", handlers=[log])
  # TFDS's bars would fill a log with carriage returns and escape codes, and one left open by
  # a failed build would carry the error on its line; the command prints what it built.
  tfds.disable_progress_bar()
  try:
    return {"build": build, "export": export, "inspect": inspect}[args.command](args)
  except (UserError, OSError) as e:  # DataError; a data_dir that cannot be written
    return errors.report(e)


if __name__ == "__main__":
  errors.exit_command(main())
