"""Throughput of the data path: pretraining batches on device, episodes, feature gathering.

1. Pretraining batches: `augment.DeviceImages.batch` (indices drawn, images gathered, random
   crop with padding, flip and colour jitter, normalisation, all in one jitted call on the
   device holding the uint8 split) against, in the same process, a host pipeline of the same
   transforms written in NumPy image by image (as a data-loader worker applies them) followed
   by the transfer to the device.
2. Episodes: index batches from `episodes.EpisodeSampler` (host NumPy), and episodes of
   features gathered on device from a cached [n, D] feature array with `features.gather`.

Images are synthetic (uniform noise) of the given size; no dataset needs to be built.

Run:  python benchmarks/data_pipeline.py --out benchmarks/results/data_pipeline_cpu.json
Figures: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax.data import augment, episodes, features

import bench_common


def host_batch(rng: np.random.Generator, images: np.ndarray, batch_size: int,
               config: augment.AugmentConfig) -> np.ndarray:
  """The baseline: indices drawn, then the same augmentations in NumPy, image by image."""
  idx = rng.integers(0, len(images), batch_size)
  return bench_common.numpy_augment(images[idx], config, rng)


def time_it(fn, repeats: int) -> float:
  fn()  # warm-up: compilation
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--image_size", type=int, default=84)
  parser.add_argument("--split_images", type=int, default=4096)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--batches", type=int, default=20, help="pretraining batches per timing")
  parser.add_argument("--episodes", type=int, default=600, help="episodes per timing")
  parser.add_argument("--feature_dim", type=int, default=640)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/results/data_pipeline.json")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  size = args.image_size
  images = rng.integers(0, 256, (args.split_images, size, size, 3), dtype=np.uint8)
  labels = np.arange(args.split_images) % 64
  config = augment.for_dataset("mini_imagenet")
  key = jax.random.key(0)

  # 1. Pretraining batches.
  data = augment.DeviceImages(images, labels, args.batch_size)
  device_step = lambda step: data.batch(key, step, config)  # draw_batch is jitted

  def device_run():
    for step in range(args.batches):
      x, _ = device_step(step)
    x.block_until_ready()

  def host_run():
    for _ in range(args.batches):
      x = jax.device_put(host_batch(rng, images, args.batch_size, config))
    x.block_until_ready()

  device_s = time_it(device_run, args.repeats)
  host_s = time_it(host_run, args.repeats)
  n_images = args.batches * args.batch_size

  # 2. Episodes: 5-way 1-shot 15-query index batches, then feature gathering on device.
  ep_labels = np.arange(args.split_images) % 64
  sampler = episodes.EpisodeSampler(ep_labels, 5, 1, 15, seed=0, split="test")
  sample_s = time_it(lambda: sampler.batch(0, args.episodes), args.repeats)
  batch = sampler.batch(0, args.episodes)
  feats = jnp.asarray(rng.standard_normal((args.split_images, args.feature_dim)), jnp.float32)
  gather_s = time_it(lambda: jax.block_until_ready(
      features.gather(feats, batch.support, batch.query)), args.repeats)

  result = {
      **bench_common.machine(),
      "settings": vars(args),
      "pretraining": {
          "device_images_per_s": n_images / device_s,
          "host_numpy_images_per_s": n_images / host_s,
          "device_over_host": host_s / device_s,
      },
      "episodes": {
          "sampler_episodes_per_s": args.episodes / sample_s,
          "gather_episodes_per_s": args.episodes / gather_s,
      },
  }
  bench_common.write_json(args.out, result)
  p, e = result["pretraining"], result["episodes"]
  print(f"device: {result['device']} ({result['platform']}); {size}x{size}x3 images, batch "
        f"{args.batch_size}; written to {args.out}")
  print("| what | rate | baseline (same process) | ratio |\n|---|---:|---:|---:|")
  print(f"| pretraining batches (crop, flip, jitter, normalise) | "
        f"{p['device_images_per_s']:,.0f} img/s on device | "
        f"{p['host_numpy_images_per_s']:,.0f} img/s NumPy on host | "
        f"{p['device_over_host']:.1f}x |")
  print(f"| episode index batches (5-way 1-shot 15-query) | "
        f"{e['sampler_episodes_per_s']:,.0f} episodes/s | | |")
  print(f"| episode features gathered (D = {args.feature_dim}) | "
        f"{e['gather_episodes_per_s']:,.0f} episodes/s | | |")


if __name__ == "__main__":
  main()
