"""Wall time of a whole few-shot evaluation: embed the test split, then denoise every episode.

Runs the pipeline's own evaluation path on synthetic data of a benchmark's size: the
test split's uint8 images embedded by the backbone (`features.embed` with the eval stage's
`embedding.embed_fn`), then `method.run_episodes` (`method.episode_metrics` over the mesh):
N-way K-shot Q-query episodes from the `EpisodeSampler`, the full T-step MetaDiff sampler
(`diffusion.sample_batch`) on every episode, and the query accuracy of the denoised prototypes. Timed warm (after a first call
that compiles), with the compile time reported apart.

The baseline, in the same process, is the original test script's structure: one episode at a
time, its reverse process a Python loop of T jitted single steps. It is timed on a few
episodes (`--baseline_episodes`) and reported as a rate, since running it on all of them
would take minutes.

miniImageNet's size (the GPU run): 12,000 test images (20 classes x 600) at 84 x 84, ResNet12,
600 episodes, T = 1000:
  python benchmarks/eval_end_to_end.py --backbone resnet12 --image_size 84 \
      --images_per_class 600 --episodes 600 --batch_episodes 600 --embed_batch 1000
Run small (CPU, about a minute):
  python benchmarks/eval_end_to_end.py --out benchmarks/results/eval_end_to_end_cpu.json
Figures: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import (backbones, diffusion, embedding, mesh, method, prototypes,
                          schedule, tcunet)
from metadiff_jax.data import augment, episodes as episodes_lib, features

import bench_common


def synthetic_split(rng, classes, per_class, size, channels):
  """uint8 images with a per-class colour bias (so that classes differ), and labels."""
  bias = rng.integers(0, 128, (classes, 1, 1, channels))
  images = rng.integers(0, 128, (classes, per_class, size, size, channels)) + bias[:, None]
  labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)
  return images.reshape(-1, size, size, channels).astype(np.uint8), labels


def one_episode_loop(model, variables, sched):
  """The baseline: one episode's reverse process as a Python loop of jitted steps."""

  @jax.jit
  def step(w, t, support, labels):
    eps = model.apply(variables, w, t, support, labels)
    return diffusion.reverse_step(sched, w, eps, t)

  def run(w, support, labels):
    for t in range(sched.num_steps - 1, -1, -1):
      w = step(w, t, support, labels)
    return w

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backbone", default="conv4", choices=backbones.NAMES)
  parser.add_argument("--image_size", type=int, default=32)
  bench_common.add_few_shot_args(parser, classes=20, images_per_class=60,
                                 steps_help="T of the sampler")
  parser.add_argument("--embed_batch", type=int, default=256)
  parser.add_argument("--episodes", type=int, default=60)
  parser.add_argument("--batch_episodes", type=int, default=60)
  parser.add_argument("--queries", type=int, default=15)
  parser.add_argument("--num_sampling_steps", type=int, default=None,
                      help="respace the sampler to this many steps (default: all T)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="computation dtype of the backbone and the denoiser")
  parser.add_argument("--baseline_episodes", type=int, default=2)
  parser.add_argument("--out", default="benchmarks/results/eval_end_to_end.json")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  images, labels = synthetic_split(rng, args.classes, args.images_per_class, args.image_size, 3)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
  module = backbones.make(args.backbone, dtype=dtype)
  backbone_vars = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, *images.shape[1:])))
  embed = embedding.embed_fn(module, augment.for_dataset("mini_imagenet"))
  dim = backbones.feature_dim(module, images.shape[1:])
  model = tcunet.TCUNet(feature_dim=dim)
  denoiser_vars = model.init(jax.random.key(1), jnp.zeros((args.ways, dim)), 0,
                             jnp.zeros((args.ways * args.shots, dim)),
                             jnp.repeat(jnp.arange(args.ways), args.shots))
  sched = schedule.respace(schedule.linear(args.steps), args.num_sampling_steps)
  sampler = episodes_lib.EpisodeSampler(labels, args.ways, args.shots, args.queries, 0, "test")
  key = jax.random.key(2)

  def evaluation():
    start = time.perf_counter()
    feats = features.embed(embed, backbone_vars, images, args.embed_batch, progress=False)
    embedded = time.perf_counter()
    m = method.run_episodes(model, denoiser_vars, sched, mesh.replicate(feats), sampler,
                            args.episodes, args.batch_episodes, key, progress=False,
                            dtype=dtype)
    done = time.perf_counter()
    return feats, m, embedded - start, done - embedded

  _, _, first_embed, first_eval = evaluation()  # compiles
  feats, m, embed_s, episodes_s = evaluation()
  total = embed_s + episodes_s
  print(f"{len(images)} images embedded in {embed_s:.3f} s ({len(images) / embed_s:.0f} img/s); "
        f"{args.episodes} episodes in {episodes_s:.3f} s ({args.episodes / episodes_s:.1f} "
        f"episodes/s); total {total:.3f} s (first call, compiling: "
        f"{first_embed + first_eval:.1f} s)", flush=True)

  # The baseline on the first few episodes, on the same features.
  baseline = one_episode_loop(model, denoiser_vars, sched)
  eps = sampler.batch(0, max(args.baseline_episodes, 1))
  w_T = method.episode_w_T(key, jnp.asarray(eps.index, jnp.int32), args.ways, dim)
  support = jnp.asarray(feats[eps.support])
  query = jnp.asarray(feats[eps.query])
  jax.block_until_ready(baseline(w_T[0], support[0], jnp.asarray(eps.support_labels[0])))
  start = time.perf_counter()
  agree = []
  for b in range(args.baseline_episodes):
    w0 = baseline(w_T[b], support[b], jnp.asarray(eps.support_labels[b]))
    logits = np.asarray(prototypes.cosine_logits(query[b], w0), np.float64)
    acc = np.mean(np.argmax(logits, -1) == eps.query_labels[b])
    # Two compiled programs of one sampler give weights equal to rounding (a relative 1e-4 at
    # most), which moves a 10 x cosine score by at most 10 pi / 2 x 1e-4: a query whose two
    # best scores are closer than twice that may go either way (docs/SCALING.md).
    top2 = np.sort(logits, -1)[:, -2:]
    near = np.sum(top2[:, 1] - top2[:, 0] < 10 * np.pi * 1e-4)
    agree.append(abs(acc - m["accuracy"][b]) <= near / len(logits) + 1e-6)
  baseline_s = (time.perf_counter() - start) / max(args.baseline_episodes, 1)
  print(f"baseline (one episode at a time, Python loop of jitted steps): {1 / baseline_s:.2f} "
        f"episodes/s, {baseline_s * args.episodes:.1f} s for {args.episodes} episodes "
        f"(extrapolated); accuracy equal (up to near-ties) on {sum(agree)}/{len(agree)} "
        "episodes", flush=True)

  result = dict(
      benchmark="eval_end_to_end", backbone=args.backbone, image_size=args.image_size,
      num_images=len(images), feature_dim=dim, episodes=args.episodes,
      batch_episodes=args.batch_episodes, ways=args.ways, shots=args.shots,
      queries=args.queries, steps=args.steps, num_sampling_steps=sched.num_steps,
      dtype=args.dtype, embed_s=embed_s, embed_images_per_s=len(images) / embed_s,
      episodes_s=episodes_s, episodes_per_s=args.episodes / episodes_s, total_s=total,
      first_call_s=first_embed + first_eval, mean_accuracy=float(m["accuracy"].mean()),
      baseline_episodes=args.baseline_episodes, baseline_episodes_per_s=1 / baseline_s,
      baseline_accuracy_equal=int(sum(agree)),
      speedup_over_baseline=(args.episodes / episodes_s) / (1 / baseline_s),
      **bench_common.machine())
  out = bench_common.write_json(args.out, result)
  print(f"| images | embed s | episodes | episodes s | total s | baseline ep/s | speed-up |\n"
        f"|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {len(images)} | {embed_s:.3f} | {args.episodes} | {episodes_s:.3f} | {total:.3f} | "
        f"{1 / baseline_s:.2f} | {result['speedup_over_baseline']:.0f}x |")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
