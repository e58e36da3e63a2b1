"""Few-shot prediction on new images with a trained (or imported) workdir.

    python -m metadiff_jax.predict --workdir runs/glyphs_conv4 \\
        --support my_support/ --query my_queries/ --out predictions.csv

`--support DIR` holds one folder per class, `DIR/<class>/<image files>`: the few labelled
examples. `--query` takes image files and folders (several may be given); a folder's images
are read from it and from its subfolders, and an image in a subfolder named after a support
class (`QUERY/<class>/...`) has that class as its true class: the CSV then has a `true`
column and the accuracy over the labelled queries is printed. Loose files and other
subfolders may sit beside the class folders; they are classified without a true class.

What it does, in the terms of the pipeline (docs/PREDICT.md has the details):

1. The workdir's config (WORKDIR/config.json), its backbone (WORKDIR/pretrain/best) and the
   input shape the backbone was trained on; no dataset needs to be built.
2. Every image is decoded to that shape. Images of another size are resized (bilinear) and
   the count is reported; colour images are converted to grey for a grey backbone and back.
3. The backbone embeds them (eval mode, the dataset's normalisation), and the features are
   rescaled where the config's variant rescales them (`config.diffusion.feature_rms`).
4. The denoiser trained for the shot setting nearest to the support set's images per class
   (WORKDIR/train_<K>shot/best, EMA parameters) denoises N prototypes from w_T ~ N(0, I)
   (seeded by the config's seed) with the configured sampler, conditioned on the support set.
5. Each query gets the softmax of its logits under the denoised prototypes (cosine similarity
   times 10, the pipeline's prototype classifier) and its most probable class.

There is no limit on the number of classes: the denoiser acts on each class's prototype with
that class's support-loss gradient, so a denoiser trained on 5-way episodes takes any N >= 2.
`method="prototypes"` classifies with the class means of the support features instead, the
baseline the eval stage reports beside MetaDiff.

The same from Python, for notebooks:

    from metadiff_jax import predict
    result = predict.predict("runs/glyphs_conv4", support="my_support", query="my_queries")
    result.predicted, result.probabilities, result.to_csv("predictions.csv")
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import pathlib
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import (backbones, checkpoint, config_lib, embedding, errors, heads, method,
                          pretraining, prototypes, pytorch_weights, rng)
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import episodes
from metadiff_jax.errors import StageError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
METHODS = ("metadiff", "prototypes")

ImageLike = Union[str, os.PathLike, np.ndarray]


class PredictError(UserError):
  """An input `predict` cannot use (a missing or unreadable image, too few classes), one line."""


@dataclasses.dataclass
class Prediction:
  """The classes of the query images.

  Attributes:
    classes: the N class names, in the order of the probability columns (the support's
      folders, sorted, or the mapping's keys in order).
    queries: the Q query names (file paths, or "query[i]" for arrays).
    probabilities: [Q, N] softmax probabilities.
    predicted: the Q most probable class names.
    true: the Q true class names, None for a query without one (a loose file, an array, a
      subfolder not named after a class); None altogether where no query has one.
    shots: the denoiser's shot setting that was used (None for method="prototypes").
    method: "metadiff" or "prototypes".
    resized: how many of the support and query images were resized to the backbone's input.
    query_names: the Q queries as the terminal table shows them: paths relative to the query
      folder (to the given paths' common folder where several were given), "query[i]" for
      arrays. Empty: the same as `queries`.
  """

  classes: tuple[str, ...]
  queries: tuple[str, ...]
  probabilities: np.ndarray
  predicted: tuple[str, ...]
  true: tuple[str | None, ...] | None
  shots: int | None
  method: str
  resized: int
  query_names: tuple[str, ...] = ()

  @property
  def labelled(self) -> int:
    """How many queries have a true class."""
    return 0 if self.true is None else sum(t is not None for t in self.true)

  @property
  def accuracy(self) -> float | None:
    """The fraction of the labelled queries whose predicted class is the true one (None if
    no query has a true class)."""
    if not self.labelled:
      return None
    return float(np.mean([p == t for p, t in zip(self.predicted, self.true) if t is not None]))

  def rows(self) -> list[dict]:
    """One dict per query: query, predicted, [true ("" where unknown)], and p(<class>) for
    every class."""
    out = []
    for i, name in enumerate(self.queries):
      row = {"query": name, "predicted": self.predicted[i]}
      if self.true is not None:
        row["true"] = "" if self.true[i] is None else self.true[i]
      row.update({f"p({c})": float(self.probabilities[i, j]) for j, c in enumerate(self.classes)})
      out.append(row)
    return out

  def to_csv(self, path) -> str:
    """Writes `rows()` as CSV (probabilities to 6 decimals); returns the path."""
    path = os.fspath(path)
    rows = self.rows()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- images

def image_files(folder) -> list[str]:
  """The image files in `folder` and its subfolders, sorted (hidden files skipped)."""
  out = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    out += [os.path.join(root, f) for f in sorted(files)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
  return out


def read_image(image: ImageLike, shape: Sequence[int], name: str) -> tuple[np.ndarray, bool]:
  """One image as uint8 [H, W, C] of `shape`, and whether it had to be resized.

  Args:
    image: a file path, or an array [H, W], [H, W, 1], [H, W, 3] (uint8, or floats in [0, 1]).
    shape: (H, W, C) of the backbone's input; C = 1 converts to grey, C = 3 to RGB.
    name: names the image in errors.

  Raises:
    PredictError: an unreadable file or an array of another kind.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only where images are read)

  height, width, channels = (int(d) for d in shape)
  try:
    if isinstance(image, np.ndarray):
      array = image
      if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
          raise ValueError(f"an array of {array.dtype} (give uint8, or floats in [0, 1])")
        array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
      if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
      if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"an array of shape {array.shape} (give [H, W], [H, W, 1] or "
                         "[H, W, 3])")
      im = Image.fromarray(array)
    else:
      im = Image.open(os.fspath(image))
    with im:
      im = im.convert("L" if channels == 1 else "RGB")
      resized = im.size != (width, height)
      if resized:
        im = im.resize((width, height), Image.Resampling.BILINEAR)
      array = np.asarray(im, np.uint8)
  except FileNotFoundError:
    raise PredictError(f"image {name} does not exist; check the path") from None
  except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, ...)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise PredictError(f"cannot read image {name} ({first}); remove it or replace it with a "
                       "readable image file") from None
  return array.reshape(height, width, channels), resized


def support_set(support) -> tuple[tuple[str, ...], list[tuple[str, ImageLike]], list[int]]:
  """(class names, [(name, image)], labels) of a support folder or a class -> images mapping.

  Raises:
    PredictError: a missing folder, fewer than 2 classes, a class without images.
  """
  if isinstance(support, Mapping):
    classes = tuple(str(c) for c in support)
    per_class = [list(support[c]) for c in support]
    items = [[(f"{c}[{i}]" if isinstance(x, np.ndarray) else os.fspath(x), x)
              for i, x in enumerate(images)] for c, images in zip(classes, per_class)]
    where = "the support mapping"
  else:
    folder = pathlib.Path(os.path.expanduser(os.fspath(support)))
    if not folder.is_dir():
      raise PredictError(f"the support folder {folder} does not exist; give a folder with one "
                         "subfolder of images per class (SUPPORT/<class>/<images>)")
    classes = tuple(sorted(d.name for d in folder.iterdir()
                           if d.is_dir() and not d.name.startswith(".")))
    items = [[(p, p) for p in image_files(folder / c)] for c in classes]
    where = f"the support folder {folder}"
  if len(classes) < 2:
    raise PredictError(f"{where} has {len(classes)} class(es); few-shot classification needs at "
                       "least 2, one subfolder of images per class (SUPPORT/<class>/<images>)")
  for name, class_items in zip(classes, items):
    if not class_items:
      raise PredictError(f"class {name!r} of {where} has no images ({', '.join(IMAGE_EXTENSIONS)}"
                         "); add at least one labelled example")
  flat = [item for class_items in items for item in class_items]
  labels = [label for label, class_items in enumerate(items) for _ in class_items]
  return classes, flat, labels


def query_set(query, classes: Sequence[str] | None = None
              ) -> tuple[list[tuple[str, ImageLike]], list[str | None] | None, list[str]]:
  """([(name, image)], true classes, shown names) of query files, folders or arrays.

  An image in a query folder's subfolder (at any depth below it) has that subfolder's name as
  its true class, as the support folder's images have theirs, when the name is one of
  `classes` (any name where `classes` is None); loose files, files given one by one, arrays
  and images of other subfolders have none (a warning names those subfolders). The shown names
  are the paths relative to the query folder, or to the given paths' common folder where
  several were given, and "query[i]" for arrays.

  Args:
    query: a file, a folder, an array [H, W(, C)] or a batch [Q, H, W, C], or a sequence of
      files, folders and arrays.
    classes: the support's class names, which query subfolders must match to give a class.

  Returns:
    The Q (name, image) pairs (the name a file's path), the Q true classes (None for a query
    without one; None altogether where no query has one), and the Q shown names.

  Raises:
    PredictError: a missing path, or no images at all.
  """
  if isinstance(query, np.ndarray) and query.ndim == 4:  # a batch [Q, H, W, C]
    query = list(query)
  if isinstance(query, (str, os.PathLike, np.ndarray)):
    query = [query]
  known = None if classes is None else set(classes)
  items, true, where, others = [], [], [], set()
  for i, entry in enumerate(query):
    if isinstance(entry, np.ndarray):
      items.append((f"query[{i}]", entry))
      true.append(None)
      where.append(None)
      continue
    path = pathlib.Path(os.path.expanduser(os.fspath(entry)))
    if path.is_file():
      items.append((os.fspath(path), os.fspath(path)))
      true.append(None)
      where.append(path)
    elif path.is_dir():
      for f in image_files(path):
        parts = pathlib.Path(f).relative_to(path).parts
        label = parts[0] if len(parts) > 1 else None
        if label is not None and known is not None and label not in known:
          others.add(label)
          label = None
        items.append((f, f))
        true.append(label)
        where.append(path)
    else:
      raise PredictError(f"query {path} does not exist; give image files or folders of images")
  if not items:
    raise PredictError(f"no query images in {', '.join(map(str, query))} "
                       f"({', '.join(IMAGE_EXTENSIONS)}); give image files or folders of images")
  if others:
    logging.warning("predict: query subfolders %s are not support classes; their images have "
                    "no true class", ", ".join(sorted(others)))
  return items, (true if any(t is not None for t in true) else None), _shown_names(items, where)


def _shown_names(items, where) -> list[str]:
  """The query names as the table shows them: relative to their folder's common parent."""
  paths = [os.path.abspath(name) for (name, _), w in zip(items, where) if w is not None]
  folders = {os.path.abspath(w if w.is_dir() else w.parent) for w in where if w is not None}
  base = None
  if len(folders) == 1:
    base = folders.pop()
  elif folders:
    try:
      base = os.path.commonpath(sorted(folders))
    except ValueError:  # paths on different drives: no common folder
      base = None
  shown, j = [], 0
  for (name, _), w in zip(items, where):
    if w is None:
      shown.append(name)
      continue
    shown.append(os.path.relpath(paths[j], base) if base is not None else name)
    j += 1
  return shown


# ----------------------------------------------------------------------------- the model

class Predictor:
  """The trained parts of a workdir, loaded once: backbone, config, denoisers per shot.

  Example:
    predictor = Predictor("runs/glyphs_conv4")
    result = predictor.predict("my_support", ["a.png", "b.png"])
  """

  def __init__(self, workdir):
    """Loads WORKDIR/config.json and the backbone of WORKDIR/pretrain/best.

    Raises:
      ConfigError: the workdir has no config.json.
      StageError: there is no backbone, or it does not fit the config.
    """
    self.workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    self.config = config_lib.load_workdir_config(self.workdir)
    self.module = embedding.backbone(self.config)
    self.variables, self.image_shape = _load_backbone(self.config, self.workdir, self.module)
    self._embed = embedding.embed_fn(self.module, embedding.augment_config(self.config))
    self._denoisers = {}

  @property
  def trained_shots(self) -> tuple[int, ...]:
    """The shot settings K with a trained denoiser in WORKDIR/train_<K>shot/best."""
    if not self.config.denoiser.unet:  # w/o UNet: nothing to train, any K
      return tuple(int(k) for k in self.config.train.shots)
    found = []
    shots = {int(k) for k in (*self.config.train.shots, *workdir_lib.shots_in(self.workdir))}
    for k in sorted(shots):
      best = os.path.join(workdir_lib.train_dir(self.workdir, k), "best")
      if os.path.isdir(best):
        with checkpoint.Checkpoints(best, max_to_keep=1) as store:
          if store.latest_step() is not None:
            found.append(k)
    return tuple(found)

  def embed(self, images: np.ndarray) -> np.ndarray:
    """[n, D] features (as the diffusion sees them) of uint8 images [n, H, W, C]."""
    batch = int(self.config.pretrain.embed_batch_size)
    n = len(images)
    size = min(batch, n)
    parts = []
    for start in range(0, n, size):  # padded to one shape: compiled once
      chunk = images[start:start + size]
      pad = size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      parts.append(np.asarray(self._embed(self.variables, chunk))[:size - pad])
    features = np.concatenate(parts)
    if not np.all(np.isfinite(features)):
      raise PredictError("the backbone gave NaN or infinite features for these images; check "
                         "the workdir's backbone (rerun its pretrain stage)")
    return embedding.rescale_features(features, self.config.diffusion.feature_rms)

  def denoiser(self, shots: int):
    """(TCUNet, its EMA params) of the K-shot setting."""
    metadiff, params = self._method(shots)
    return metadiff.model, params

  def _method(self, shots: int):
    """(`method.MetaDiff`, its EMA params) of the K-shot setting, read once."""
    if shots not in self._denoisers:
      metadiff, state, _, _ = workdir_lib.load_denoiser(self.config, self.workdir, shots,
                                                        self._feature_dim())
      self._denoisers[shots] = (metadiff, state.ema_params)
    return self._denoisers[shots]

  def choose_shots(self, per_class: Sequence[int]) -> int:
    """The trained shot setting nearest to the support's mean images per class (ties: fewer).

    Raises:
      StageError: no denoiser was trained in this workdir.
    """
    trained = self.trained_shots
    if not trained:
      raise StageError(f"no trained denoiser in {self.workdir} (train_<K>shot/best); run the "
                       "train stage (python -m metadiff_jax.main ... --config.stages=\"('train',)\""
                       "), import one (python -m metadiff_jax.import_torch), or use "
                       "method='prototypes' (--method prototypes)")
    mean = float(np.mean(per_class))
    return min(trained, key=lambda k: (abs(k - mean), k))

  def predict(self, support, query, shots: int | None = None, method: str = "metadiff",
              seed: int | None = None) -> Prediction:
    """Classifies the query images by the support set (see `predict`)."""
    if method not in METHODS:
      raise PredictError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    classes, support_items, labels = support_set(support)
    query_items, true, shown = query_set(query, classes)
    arrays, resized = [], 0
    for name, image in [*support_items, *query_items]:
      array, was_resized = read_image(image, self.image_shape, name)
      arrays.append(array)
      resized += was_resized
    if resized:
      logging.warning("predict: resized %d of %d images to the backbone's input %dx%d",
                      resized, len(arrays), self.image_shape[0], self.image_shape[1])
    features = self.embed(np.stack(arrays))
    support_features = features[:len(support_items)]
    query_features = features[len(support_items):]
    labels = np.asarray(labels, np.int32)
    ways = len(classes)
    per_class = np.bincount(labels, minlength=ways)
    if method == "prototypes":
      w0 = prototypes.class_means(support_features, labels, ways)
      head, used_shots = "prototype", None
    else:
      used_shots = int(shots) if shots is not None else self.choose_shots(per_class)
      if len(set(per_class.tolist())) > 1:
        logging.warning("predict: the classes have %s support images; the %d-shot denoiser was "
                        "trained on classes of equal size", sorted(set(per_class.tolist())),
                        used_shots)
      metadiff, params = self._method(used_shots)
      head = metadiff.model.head
      w0 = self._sample(metadiff, params, support_features, labels, ways, seed)
    logits = heads.logits(head, jnp.asarray(w0), jnp.asarray(query_features))
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    if not np.all(np.isfinite(probabilities)):
      raise PredictError("the denoised prototypes gave NaN probabilities (a diverged denoiser); "
                         "use method='prototypes' (--method prototypes), or retrain with the "
                         "recommended variant (docs/STABILITY.md)")
    predicted = tuple(classes[i] for i in probabilities.argmax(axis=1))
    return Prediction(classes=classes, queries=tuple(name for name, _ in query_items),
                      probabilities=probabilities, predicted=predicted,
                      true=tuple(true) if true is not None else None, shots=used_shots,
                      method=method, resized=resized, query_names=tuple(shown))

  def _sample(self, metadiff, params, support_features, labels, ways, seed):
    """[N, dim] the denoised weights of one episode (the config's sampler and schedule)."""
    key = rng.seed_key(self.config.seed if seed is None else int(seed), "predict")
    dim = heads.weight_dim(metadiff.model.head, support_features.shape[-1])
    index = jnp.zeros(1, jnp.int32)  # the one episode, as episode 0 of a batch
    w0 = metadiff.sample({"params": params}, method.episode_w_T(key, index, ways, dim),
                         jnp.asarray(support_features)[None], jnp.asarray(labels)[None],
                         noise_keys=method.episode_noise_keys(key, index))
    return np.asarray(w0[0])

  def _feature_dim(self) -> int:
    return backbones.feature_dim(self.module, self.image_shape)


def predict(workdir, support, query, shots: int | None = None, method: str = "metadiff",
            seed: int | None = None) -> Prediction:
  """Classifies query images by a few labelled support images with a workdir's model.

  Args:
    workdir: a workdir where the pipeline ran (or `import_torch` wrote its checkpoints).
    support: a folder SUPPORT/<class>/<images>, or a mapping class name -> image files or
      arrays ([H, W] / [H, W, C], uint8 or floats in [0, 1]).
    query: image files, folders (searched recursively; class subfolders give the true
      classes), arrays, or a batch [Q, H, W, C].
    shots: the denoiser's shot setting; None takes the trained one nearest to the support's
      images per class.
    method: "metadiff" (the denoised prototypes) or "prototypes" (the support's class means).
    seed: the seed of w_T; None takes the config's.

  Returns:
    A `Prediction` ([Q, N] probabilities, predicted classes, `to_csv`).

  Each call reads the workdir afresh (a notebook that retrains sees the new weights); keep a
  `Predictor(workdir)` to classify many sets with one load.

  Raises:
    UserError: one line saying what to fix (no trained model, a missing or unreadable image,
      fewer than 2 classes, a class without images).
  """
  return Predictor(workdir).predict(support, query, shots=shots, method=method, seed=seed)


def _load_backbone(config, workdir: str, module):
  """(variables, image shape) of the backbone in WORKDIR/pretrain/best, checked against the
  configured module; without the dataset (the classifier head that sized it is dropped)."""
  directory = workdir_lib.backbone_dir(workdir)
  latest = checkpoint.read_latest(directory)
  if latest is None:
    raise StageError(f"no trained backbone in {directory}; run the pipeline in this workdir "
                     "(python -m metadiff_jax.main) or import one (python -m "
                     "metadiff_jax.import_torch)")
  saved, meta = latest
  image_shape = meta.get("image_shape")
  if image_shape is None:  # a workdir of an earlier version: the dataset knows
    try:
      image_shape = list(pretraining.base_split_shape(config)[0])
    except UserError:
      raise StageError(f"{directory} does not record the backbone's input size and the dataset "
                       f"{config.data.name!r} is not built to tell it; build the dataset or "
                       "rerun the pretrain stage") from None
  image_shape = tuple(int(d) for d in image_shape)
  variables = pretraining.backbone_variables(saved)
  try:
    pytorch_weights.check_backbone_fits(module, image_shape, variables,
                                        f"the backbone in {directory}",
                                        "its config.json was changed since; restore it or rerun "
                                        "the pretrain stage")
  except ValueError as e:
    raise StageError(str(e)) from None
  variables = jax.tree.map(jnp.asarray, variables)
  return variables, image_shape


# ----------------------------------------------------------------------------- an example

def export_example(workdir, out, ways: int = 5, shots: int = 5, queries: int = 5,
                   split: str = "test", seed: int = 0) -> tuple[str, str]:
  """Writes one episode of the workdir's dataset as image folders, to try `predict` on.

  OUT/support/<class>/<i>.png holds `shots` images per class and OUT/query/<class>/<i>.png
  `queries` others, of `ways` classes of `split` (classes the backbone and denoiser never saw
  when split is "test"). Needs the dataset built.

  Returns:
    (support folder, query folder).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only where images are written)
  from metadiff_jax.data import load  # pylint: disable=g-import-not-at-top  (tensorflow-datasets)
  config = config_lib.load_workdir_config(workdir)
  data = embedding.load_split(config, split)
  names = load.class_names(embedding.dataset_ref(config), split)
  sampler = episodes.EpisodeSampler(data.labels, ways, shots, queries, seed, split)
  episode = sampler.batch(0, 1)
  out = os.path.abspath(os.path.expanduser(os.fspath(out)))
  folders = {}
  for part, index, labels in (("support", episode.support[0], episode.support_labels[0]),
                              ("query", episode.query[0], episode.query_labels[0])):
    folders[part] = os.path.join(out, part)
    for i, (row, label) in enumerate(zip(index, labels)):
      name = _folder_name(names[int(episode.classes[0][label])])
      folder = os.path.join(folders[part], name)
      os.makedirs(folder, exist_ok=True)
      image = np.asarray(data.images[int(row)])
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
          os.path.join(folder, f"{i:03d}.png"))
  return folders["support"], folders["query"]


def _folder_name(name: str) -> str:
  """A class name as a folder name (path separators replaced)."""
  return "".join("_" if c in "/\\:" else c for c in str(name)) or "_"


# ----------------------------------------------------------------------------- the command

def _print_table(result: Prediction, limit: int = 20) -> None:
  """The first `limit` queries: their path under the query folder, prediction and truth."""
  names = list(result.query_names or result.queries)[:limit]
  predicted = result.predicted[:limit]
  name_width = max(len("query"), *map(len, names))
  class_width = max(len("predicted"), *map(len, predicted))
  header = f"{'query':<{name_width}}  {'predicted':<{class_width}}  {'p':<5}"
  print(header + ("  true" if result.true is not None else ""), flush=True)
  for i, name in enumerate(names):
    p = result.probabilities[i].max()
    truth = result.true[i] if result.true is not None and result.true[i] is not None else ""
    print(f"{name:<{name_width}}  {predicted[i]:<{class_width}}  {p:.3f}"
          + (f"  {truth}" if truth else ""))
  if len(result.queries) > limit:
    print(f"... and {len(result.queries) - limit} more")


def _accuracy_summary(result: Prediction) -> str:
  """"accuracy A% (L of Q queries labelled); " where some queries have a true class."""
  if result.accuracy is None:
    return ""
  return (f"accuracy {100 * result.accuracy:.2f}% ({result.labelled} of "
          f"{len(result.queries)} queries labelled); ")


def main(argv=None) -> int:
  """The command line; returns the exit status (2 for a problem the user can fix)."""
  parser = errors.ArgumentParser(
      prog="python -m metadiff_jax.predict",
      description="Classify new images from a few labelled examples with a trained workdir.")
  parser.add_argument("--workdir", required=True, help="a trained (or imported) run's workdir")
  parser.add_argument("--support", help="SUPPORT/<class>/<images>: the labelled examples")
  parser.add_argument("--query", nargs="+", help="image files or folders to classify")
  parser.add_argument("--out", help="CSV of the predictions (default WORKDIR/predictions.csv)")
  parser.add_argument("--shots", type=int, help="the denoiser's shot setting (default: the "
                      "trained one nearest to the support's images per class)")
  parser.add_argument("--method", default="metadiff", choices=METHODS)
  parser.add_argument("--seed", type=int, help="seed of the initial noise (default: the config's)")
  parser.add_argument("--export_example", metavar="DIR", help="instead: write one test episode "
                      "of the workdir's dataset to DIR/support and DIR/query, to try predict on")
  parser.add_argument("--ways", type=int, default=5, help="with --export_example")
  parser.add_argument("--export_shots", type=int, default=5, help="with --export_example")
  parser.add_argument("--queries", type=int, default=5, help="with --export_example: per class")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  try:
    if args.export_example:
      support, query = export_example(args.workdir, args.export_example, args.ways,
                                      args.export_shots, args.queries)
      print(f"wrote {support} and {query}; now run:\n  python -m metadiff_jax.predict "
            f"--workdir {args.workdir} --support {support} --query {query}")
      return 0
    if not args.support or not args.query:
      parser.error("--support and --query are required (or --export_example DIR)")
    result = predict(args.workdir, args.support, args.query, shots=args.shots,
                     method=args.method, seed=args.seed)
    out = args.out or os.path.join(os.path.expanduser(args.workdir), "predictions.csv")
    result.to_csv(out)
  except (UserError, OSError) as e:  # OSError: e.g. an --out that cannot be written
    return errors.report(e)
  _print_table(result)
  used = f"{result.shots}-shot denoiser" if result.shots is not None else "class means"
  print(f"{len(result.queries)} queries, {len(result.classes)} classes ({used}); "
        + (f"{result.resized} images resized; " if result.resized else "")
        + _accuracy_summary(result)
        + f"wrote {out}", flush=True)
  return 0


if __name__ == "__main__":
  errors.exit_command(main())
