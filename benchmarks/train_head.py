"""Episodes per second of diffusion training (Algorithm 1), against a host-fed loop.

Measures `method.train_steps`, the pipeline's own training call: `steps_per_call`
optimiser steps in one `lax.scan`, each step's episodes drawn on the device from the base
split's class table (`episodes.draw_support`), the TCUNet loss of Eq. 12, Adam with L2 and the
EMA update, with no host round trip between steps. The baseline, in the same process, is the
original code's structure: one optimiser step per host call on a batch of episodes drawn on
the host (`EpisodeSampler`), copied to the device, with the loss read back every step.

Synthetic base features of miniImageNet's size by default (64 classes x 600 images, D = 512),
5-way 1-shot.

Run:  python benchmarks/train_head.py --out benchmarks/results/train_head_cpu.json
GPU:  python benchmarks/train_head.py --episodes 8,64,256,1024,4096 --steps_per_call 500
Figures: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import method, schedule, tcunet
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.train_state import DiffusionState, adam_l2

import bench_common


def make_state(model, dim, ways, shots):
  variables = model.init(jax.random.key(0), jnp.zeros((ways, dim)), 0,
                         jnp.zeros((ways * shots, dim)), jnp.repeat(jnp.arange(ways), shots))
  return DiffusionState.create(apply_fn=model.apply, params=variables["params"],
                               tx=adam_l2(1e-4, 5e-4),
                               ema_params=jax.tree_util.tree_map(jnp.copy,
                                                                 variables["params"]))


def host_fed_step(model, sched):
  """The baseline's step: one optimiser step on episodes gathered on the host."""
  step = bench_common.diffusion_train_step(model, 0.9999, 2000)
  return jax.jit(lambda state, support, labels, w0, key: step(state, sched, w0, support,
                                                              labels, key))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--episodes", default="8,64,256", help="episodes per step, comma-separated")
  parser.add_argument("--steps_per_call", type=int, default=50)
  parser.add_argument("--calls", type=int, default=3, help="timed calls of the scanned steps")
  parser.add_argument("--baseline_steps", type=int, default=30)
  parser.add_argument("--baseline_max_episodes", type=int, default=1 << 30,
                      help="skip the host-fed baseline above this batch")
  bench_common.add_few_shot_args(parser, classes=64, images_per_class=600,
                                 steps_help="T of the diffusion")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--out", default="benchmarks/results/train_head.json")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  n = args.classes * args.images_per_class
  labels = np.repeat(np.arange(args.classes, dtype=np.int32), args.images_per_class)
  features = np.abs(rng.standard_normal((n, args.dim))).astype(np.float32)
  targets = np.stack([features[labels == c].mean(0) for c in range(args.classes)])
  table = episodes_lib.class_table(labels)
  sampler = episodes_lib.EpisodeSampler(labels, args.ways, args.shots, 0, 0, "train")
  sched = schedule.linear(args.steps)
  model = tcunet.TCUNet(feature_dim=args.dim)
  features_dev, targets_dev = jnp.asarray(features), jnp.asarray(targets)
  table_dev = episodes_lib.ClassTable(*(jnp.asarray(x) for x in table))
  key, episode_key = jax.random.key(1), jax.random.key(2)
  baseline_step = host_fed_step(model, sched)

  rows = []
  for b in [int(x) for x in args.episodes.split(",")]:
    k = args.steps_per_call

    def scanned(state):
      return method.train_steps(model, state, sched, features_dev, targets_dev, table_dev,
                                episode_key, key, k, b, args.ways, args.shots, 0.9999, 2000)

    state = make_state(model, args.dim, args.ways, args.shots)
    state, losses = scanned(state)  # compile
    jax.block_until_ready(losses)
    times = []
    for _ in range(args.calls):
      start = time.perf_counter()
      state, losses = scanned(state)
      jax.block_until_ready(losses)
      times.append(time.perf_counter() - start)
    assert np.all(np.isfinite(np.asarray(losses)))
    row = {"episodes_per_step": b, "steps_per_call": k,
           "scan_s_per_step": statistics.median(times) / k}
    row["scan_episodes_per_s"] = b / row["scan_s_per_step"]

    if b <= args.baseline_max_episodes:
      state = make_state(model, args.dim, args.ways, args.shots)

      def host_step(state, s):
        eps = sampler.batch(s * b, b)
        support = jnp.asarray(features[eps.support])
        w0 = jnp.asarray(targets[eps.classes])
        state, loss = baseline_step(state, support, jnp.asarray(eps.support_labels), w0, key)
        float(loss)  # the loss read back every step, as a host-driven loop logs it
        return state

      state = host_step(state, 0)  # compile
      start = time.perf_counter()
      for s in range(1, args.baseline_steps + 1):
        state = host_step(state, s)
      row["loop_s_per_step"] = (time.perf_counter() - start) / args.baseline_steps
      row["loop_episodes_per_s"] = b / row["loop_s_per_step"]
      row["scan_over_loop"] = row["scan_episodes_per_s"] / row["loop_episodes_per_s"]
    rows.append(row)
    print(f"B={b:6d}  scan {row['scan_episodes_per_s']:12.0f} ep/s "
          f"({1e6 * row['scan_s_per_step']:8.1f} us/step)"
          + (f"  host-fed loop {row['loop_episodes_per_s']:10.0f} ep/s  ratio "
             f"{row['scan_over_loop']:6.1f}x" if "loop_s_per_step" in row else ""),
          flush=True)

  result = dict(
      benchmark="train_head", ways=args.ways, shots=args.shots, dim=args.dim,
      classes=args.classes, images_per_class=args.images_per_class, diffusion_steps=args.steps,
      rows=rows, **bench_common.machine())
  out = bench_common.write_json(args.out, result)
  print(markdown(result))
  print(f"wrote {out}")


def markdown(result):
  lines = ["| episodes / step | scanned steps ep/s | us / step | host-fed loop ep/s | ratio |",
           "|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    loop = (f"{r['loop_episodes_per_s']:.0f} | {r['scan_over_loop']:.1f}x"
            if "loop_s_per_step" in r else "not run | ")
    lines.append(f"| {r['episodes_per_step']} | {r['scan_episodes_per_s']:.0f} | "
                 f"{1e6 * r['scan_s_per_step']:.1f} | {loop} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
