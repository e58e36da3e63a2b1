"""Images per second of backbone pretraining and feature extraction, on device against host-fed.

1. Pretraining: one SGD step of the backbone with its linear head on a batch drawn from a
   synthetic uint8 split of the real image size.
   - "device": the split sits on the device as uint8; each step draws its batch, augments it
     (`augment.draw_batch`: miniImageNet's crop, flip and colour jitter, or the glyph set's for
     one channel) and trains, all in one jitted call; `--steps` steps are dispatched back to
     back and the host waits only at the end of the timed window. In float32 and in bfloat16
     compute (`dtype=jnp.bfloat16` on the backbone; parameters, head and loss stay float32).
   - baseline "host", in the same process: indices, gather and the same augmentations in NumPy
     on the host, image by image as a PyTorch DataLoader's transforms run, then the transfer and
     the jitted step (float32), as a host-fed loop does (JAX's asynchronous dispatch still
     overlaps the next batch's preparation with the device's step).
2. Feature extraction: the backbone in eval mode (`train=False`) over a split of
   `--num_images` uint8 images resident on the device, normalised there, in batches of
   `--extract_batch`, float32 and bfloat16; baseline: the same jitted forward fed from the host
   batch by batch with the features fetched after each, as `data.features.embed` does.
   Then the agreement of the bfloat16 features with the float32 ones: their mean relative L2
   error, and the fraction of nearest-class-mean (cosine) predictions left unchanged on
   synthetic 5-way episodes drawn from the features. The backbone is the float32 one after the
   benchmark's few SGD steps, close to its random init, and the images are noise: the
   agreement is a rough check of bfloat16 arithmetic, not of a trained backbone's accuracy.

The benchmark imports neither the stages nor the data stack (no ml_collections or
tensorflow-datasets needed), so it runs wherever JAX, Flax and Optax do.

Run (CPU, about a minute):  python benchmarks/pretrain.py
Full size (GPU):  python benchmarks/pretrain.py --backbone resnet12 --image_size 84 --batch 128
  --num_images 12000 --extract_batch 1000 --steps 20 --out benchmarks/results/pretrain_gpu.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metadiff_jax import backbones
from metadiff_jax.data import augment
from metadiff_jax.train_state import PretrainState, sgd_l2

import bench_common


class Classifier(nn.Module):
  """The backbone with a linear head over the base classes: logits [B, C].

  Mirrors `metadiff_jax.pretraining.Classifier` (the library imports the config and data
  stacks, which the machines this benchmark targets may lack).
  """

  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes, name="head")(self.backbone(x, train=train))


def _sgd_step(state: PretrainState, x, y, dropout_key):
  """One SGD step on a normalised batch; mirrors `pretraining.train_step`'s SGD step."""
  rng = jax.random.fold_in(dropout_key, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    # The loss in float32 whatever the compute dtype, as mixed-precision training does.
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (updates, jnp.mean(jnp.argmax(logits, -1) == y))

  (loss, (updates, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
  return state, {"loss": loss, "accuracy": acc}


def initial_state(backbone: nn.Module, num_classes: int, image_shape, key) -> PretrainState:
  """Classifier variables and SGD state at step 0, as `pretraining.initial_state` builds."""
  model = Classifier(backbone, num_classes)
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(key, jnp.zeros((1, *image_shape), jnp.float32))
  # Classifier-Baseline's SGD (the config's defaults); the values do not change the speed.
  return PretrainState.create(apply_fn=model.apply, params=variables["params"],
                              tx=sgd_l2(0.05, 0.9, 5e-4),
                              batch_stats=variables.get("batch_stats", {}))


def backbone_variables(state: PretrainState) -> dict:
  """The backbone's own variables out of the classifier's."""
  out = {"params": state.params["backbone"]}
  if state.batch_stats and "backbone" in state.batch_stats:
    out["batch_stats"] = state.batch_stats["backbone"]
  return out


def _flops(compiled) -> float | None:
  """FLOPs of one call of a compiled executable, where the backend counts them."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (an optional figure: some backends do not count)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def median_windows(windows: dict, repeats: int) -> dict:
  """Median wall time of each warmed-up `windows[name]()` (each blocks at its end).

  The windows take turns, repeat after repeat, so that a change in the machine's load (a
  shared CPU) falls on all of them alike rather than on whichever ran last.
  """
  times = {name: [] for name in windows}
  for _ in range(repeats):
    for name, window in windows.items():
      start = time.perf_counter()
      window()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def device_pretraining(backbone, args, images_dev, labels_dev, aug, key):
  """(timed window of `args.steps` steps, FLOPs per step, () -> the current state).

  The on-device loop, compiled and warmed up.
  """
  state = initial_state(backbone, args.classes_base, images_dev.shape[1:], key)
  data_key, dropout_key = jax.random.split(jax.random.fold_in(key, 1))

  def step(state, images, labels, data_key, dropout_key):
    # Mirrors `pretraining.train_step`: the batch of step `state.step`, drawn on device.
    x, y = augment.draw_batch(images, labels, data_key, state.step, args.batch, aug)
    return _sgd_step(state, x, y, dropout_key)

  compiled = jax.jit(step, donate_argnums=(0,)).lower(
      state, images_dev, labels_dev, data_key, dropout_key).compile()
  holder = [state]

  def run(steps):
    s = holder[0]
    for _ in range(steps):  # no host sync inside: the steps queue up on the device
      s, _ = compiled(s, images_dev, labels_dev, data_key, dropout_key)
    jax.block_until_ready(s)
    holder[0] = s

  run(1)  # warm-up
  return lambda: run(args.steps), _flops(compiled), lambda: holder[0]


def host_pretraining(backbone, args, images, labels, aug, key):
  """(timed window, FLOPs per step) of the host-fed loop: NumPy batches, then the step."""
  state = initial_state(backbone, args.classes_base, images.shape[1:], key)
  dropout_key = jax.random.fold_in(key, 2)
  x0 = jnp.zeros((args.batch, *images.shape[1:]), jnp.float32)
  y0 = jnp.zeros((args.batch,), jnp.int32)
  # Mirrors `pretraining.train_step_on_batch`.
  compiled = jax.jit(_sgd_step, donate_argnums=(0,)).lower(state, x0, y0, dropout_key).compile()
  rng = np.random.default_rng(1)
  per_epoch = len(images) // args.batch
  holder = [state, 0, rng.permutation(len(images))]

  def run(steps):
    s, j, perm = holder
    for _ in range(steps):
      if j == per_epoch:  # a new epoch, shuffled as a DataLoader's sampler does
        j, perm = 0, rng.permutation(len(images))
      idx = perm[j * args.batch:(j + 1) * args.batch]
      j += 1
      x = jax.device_put(bench_common.numpy_augment(images[idx], aug, rng))
      s, _ = compiled(s, x, jax.device_put(labels[idx]), dropout_key)
    jax.block_until_ready(s)
    holder[:] = [s, j, perm]

  run(1)  # warm-up
  return lambda: run(args.steps), _flops(compiled)


def _batch_starts(n: int, batch: int) -> list[int]:
  """Batch offsets covering [0, n); the last batch is moved back to end at n (same shape)."""
  return [min(start, n - batch) for start in range(0, n, batch)]


def device_extraction(backbone, variables, images_dev, aug, batch):
  """(one-pass timed window, FLOPs per batch, () -> features [n, D] float32), split on device."""
  n = images_dev.shape[0]

  def extract(variables, images, start):
    x = jax.lax.dynamic_slice_in_dim(images, start, batch)
    return backbone.apply(variables, augment.preprocess(x, aug), train=False).astype(
        jnp.float32)

  compiled = jax.jit(extract).lower(variables, images_dev, np.int32(0)).compile()
  starts = _batch_starts(n, batch)

  def run():
    # Dispatched back to back; the host waits once, for the last batch.
    return jax.block_until_ready(
        [compiled(variables, images_dev, np.int32(s)) for s in starts])

  def features():
    outs = [np.asarray(o) for o in run()]
    feats = np.empty((n, outs[0].shape[1]), np.float32)
    for start, out in zip(starts, outs):
      feats[start:start + batch] = out
    return feats

  run()  # warm-up
  return run, _flops(compiled), features


def host_extraction(backbone, variables, images, aug, batch):
  """The timed window (one pass) of the host-fed extraction (`data.features.embed`'s loop)."""
  fn = jax.jit(lambda v, x: backbone.apply(v, augment.preprocess(x, aug), train=False))
  starts = _batch_starts(len(images), batch)

  def run():
    for s in starts:  # a transfer in, the features out: a host sync per batch
      np.asarray(fn(variables, images[s:s + batch]), np.float32)

  run()  # warm-up
  return run


def ncm_predictions(feats, labels, episodes, ways, shots, queries, seed):
  """Nearest-class-mean (cosine) predictions [E, N*Q] on episodes drawn from `labels`."""
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  by_class = {c: np.flatnonzero(labels == c) for c in classes}
  support = np.empty((episodes, ways, shots), np.int64)
  query = np.empty((episodes, ways * queries), np.int64)
  for e in range(episodes):
    for k, c in enumerate(rng.choice(classes, ways, replace=False)):
      idx = rng.choice(by_class[c], shots + queries, replace=False)
      support[e, k] = idx[:shots]
      query[e, k * queries:(k + 1) * queries] = idx[shots:]

  def run(f):
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    protos = f[support].mean(axis=2)  # [E, N, D]
    protos /= np.maximum(np.linalg.norm(protos, axis=-1, keepdims=True), 1e-12)
    return np.argmax(np.einsum("eqd,end->eqn", f[query], protos), axis=-1)

  return run


def feature_agreement(fp32, bf16, labels, episodes, seed=0) -> dict:
  """Mean relative L2 error of `bf16` against `fp32`, and the NCM predictions it keeps."""
  err = np.linalg.norm(bf16 - fp32, axis=-1) / np.maximum(np.linalg.norm(fp32, axis=-1), 1e-12)
  out = {"mean_relative_l2_error": float(err.mean()), "max_relative_l2_error": float(err.max()),
         "episodes": episodes, "ways": 5, "queries": 15}
  for shots in (1, 5):
    predict = ncm_predictions(fp32, labels, episodes, 5, shots, 15, seed + shots)
    out[f"ncm_unchanged_{shots}shot"] = float(np.mean(predict(fp32) == predict(bf16)))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backbone", default="conv4", choices=backbones.NAMES)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=3, choices=(1, 3),
                      help="3: miniImageNet's augmentation; 1: the glyph set's")
  parser.add_argument("--batch", type=int, default=64, help="pretraining batch size")
  parser.add_argument("--train_images", type=int, default=38400,
                      help="images of the synthetic base split (miniImageNet's 38,400)")
  parser.add_argument("--classes_base", type=int, default=64, help="base classes (head width)")
  parser.add_argument("--steps", type=int, default=5, help="pretraining steps per timed window")
  parser.add_argument("--num_images", type=int, default=2000,
                      help="images of the split embedded (miniImageNet's test split: 12,000)")
  parser.add_argument("--classes", type=int, default=20,
                      help="classes of the embedded split (for the NCM episodes)")
  parser.add_argument("--extract_batch", type=int, default=500)
  parser.add_argument("--episodes", type=int, default=600, help="NCM episodes per shot")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/results/pretrain.json")
  args = parser.parse_args()
  if args.extract_batch > args.num_images or args.batch > args.train_images:
    parser.error("a batch exceeds its split: lower --batch / --extract_batch")
  if args.num_images // args.classes < 20:
    parser.error("the NCM episodes need 20 images per class (5 shots + 15 queries): raise "
                 "--num_images or lower --classes")

  rng = np.random.default_rng(0)
  shape = (args.image_size, args.image_size, args.channels)
  aug = augment.for_dataset("mini_imagenet" if args.channels == 3 else "glyphs")
  train_images = rng.integers(0, 256, (args.train_images, *shape), dtype=np.uint8)
  train_labels = (np.arange(args.train_images) % args.classes_base).astype(np.int32)
  key = jax.random.key(0)
  fp32 = backbones.make(args.backbone)
  bf16 = backbones.make(args.backbone, dtype=jnp.bfloat16)

  # 1. Pretraining.
  images_dev, labels_dev = jax.device_put(train_images), jax.device_put(train_labels)
  dev32, step_flops, state = device_pretraining(fp32, args, images_dev, labels_dev, aug, key)
  dev16, _, _ = device_pretraining(bf16, args, images_dev, labels_dev, aug, key)
  host, host_flops = host_pretraining(fp32, args, train_images, train_labels, aug, key)
  t = median_windows({"dev32": dev32, "dev16": dev16, "host": host}, args.repeats)
  dev32_s, dev16_s, host_s = (t[k] / args.steps for k in ("dev32", "dev16", "host"))
  variables = backbone_variables(state())
  del images_dev, labels_dev, dev32, dev16, host  # the extraction split's device memory next

  # 2. Feature extraction, with the backbone the float32 loop left.
  test_images = rng.integers(0, 256, (args.num_images, *shape), dtype=np.uint8)
  test_labels = np.arange(args.num_images) % args.classes
  test_dev = jax.device_put(test_images)
  ext32, ext_flops, feats32 = device_extraction(fp32, variables, test_dev, aug,
                                                args.extract_batch)
  ext16, _, feats16 = device_extraction(bf16, variables, test_dev, aug, args.extract_batch)
  exthost = host_extraction(fp32, variables, test_images, aug, args.extract_batch)
  t = median_windows({"ext32": ext32, "ext16": ext16, "host": exthost}, args.repeats)
  ext32_s, ext16_s, exthost_s = t["ext32"], t["ext16"], t["host"]
  feats32, feats16 = feats32(), feats16()
  agreement = feature_agreement(feats32, feats16, test_labels, args.episodes)

  def row(what, name, seconds, images, baseline_s, flops, baseline):
    r = {"what": what, "name": name, "seconds": seconds, "images_per_s": images / seconds,
         "ratio_to_baseline": baseline_s / seconds, "baseline": baseline}
    # FLOPs of the compiled float32 program (bf16 does the same arithmetic in another type).
    r["gflops_per_s"] = flops / seconds / 1e9 if flops else None
    return r

  n_ext = args.num_images
  batches = len(_batch_starts(n_ext, args.extract_batch))
  ext_total_flops = ext_flops * batches if ext_flops else None
  rows = [
      row("pretrain step, batch drawn and augmented on device, fp32", "pretrain_device_fp32",
          dev32_s, args.batch, host_s, step_flops, "pretrain_host_fp32"),
      row("pretrain step, batch drawn and augmented on device, bf16", "pretrain_device_bf16",
          dev16_s, args.batch, host_s, step_flops, "pretrain_host_fp32"),
      row("pretrain step, NumPy batch on host + transfer, fp32 (baseline)",
          "pretrain_host_fp32", host_s, args.batch, host_s, host_flops, "pretrain_host_fp32"),
      row("feature extraction, split on device, fp32", "extract_device_fp32", ext32_s, n_ext,
          exthost_s, ext_total_flops, "extract_host_fp32"),
      row("feature extraction, split on device, bf16", "extract_device_bf16", ext16_s, n_ext,
          exthost_s, ext_total_flops, "extract_host_fp32"),
      row("feature extraction, host-fed per batch (as features.embed), fp32 (baseline)",
          "extract_host_fp32", exthost_s, n_ext, exthost_s, ext_total_flops,
          "extract_host_fp32"),
  ]
  result = dict(
      benchmark="pretrain", settings=vars(args), augmentation=str(aug),
      feature_dim=int(feats32.shape[1]), rows=rows,
      images_per_s={r["name"]: r["images_per_s"] for r in rows},
      bf16_agreement=agreement, **bench_common.machine())
  out = bench_common.write_json(args.out, result)
  print(f"{result['device']} ({result['platform']}); {args.backbone} on "
        f"{args.image_size}x{args.image_size}x{args.channels}, pretraining batch {args.batch}, "
        f"{n_ext} images embedded in batches of {args.extract_batch}")
  print(_markdown(result))
  print(f"wrote {out}")


def _markdown(result) -> str:
  lines = ["| what | img/s | GFLOP/s | ratio to baseline |", "|---|---:|---:|---:|"]
  for r in result["rows"]:
    gflops = f"{r['gflops_per_s']:.1f}" if r["gflops_per_s"] else "-"
    lines.append(f"| {r['what']} | {r['images_per_s']:,.0f} | {gflops} | "
                 f"{r['ratio_to_baseline']:.2f}x |")
  a = result["bf16_agreement"]
  lines.append("")
  lines.append(f"bf16 vs fp32 features: mean relative L2 error {a['mean_relative_l2_error']:.2e} "
               f"(max {a['max_relative_l2_error']:.2e}); nearest-class-mean (cosine) predictions "
               f"unchanged: {a['ncm_unchanged_1shot']:.2%} (5-way 1-shot), "
               f"{a['ncm_unchanged_5shot']:.2%} (5-shot), {a['episodes']} episodes each, 15 "
               "queries per class (random-init backbone on noise images: a rough check)")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
