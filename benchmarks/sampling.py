"""Episodes per second of the 1000-step MetaDiff sampler, against a Python-loop baseline.

Measures `diffusion.sample_batch` (the whole reverse process as one compiled `lax.scan`) at
several episode counts, 5-way 1-shot, D = 512, and in the same process a baseline that
drives the same reverse step, jitted alone, from a Python loop: the original code's structure,
which shows what the loop itself costs. With
`--torch`, where PyTorch imports, it also times a PyTorch eager sampler of the same network
(written from the reference formulas, checked equal to ours before timing).

Run:  python benchmarks/sampling.py --out benchmarks/results/sampling_cpu.json
Figures: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import diffusion, prototypes, schedule, tcunet


def sample_flops(model: tcunet.TCUNet, episodes: int, num_classes: int, num_steps: int) -> float:
  """FLOPs of the reverse process for a batch of episodes (a multiply-add counts as two).

  Per step and episode: the five feature transforms on N rows and the elementwise gradient,
  gating and update (about 12 N D). Per step, once for the whole batch: the five time-embedding
  layers and the gate, which depend on t alone and which every sampler here shares across
  episodes. The once-per-episode class sums are left out.
  """
  d, e = model.feature_dim, model.time_embed_dim
  outs = model.widths
  ins = (d,) + outs[:-1]
  per_episode = sum(2 * num_classes * i * o for i, o in zip(ins, outs)) + 12 * num_classes * d
  per_batch = sum(2 * e * o for o in outs) + 2 * e * (e // 2) + 2 * (e // 2)
  return float(num_steps * (episodes * per_episode + per_batch))


def make_inputs(seed, episodes, ways, shots, dim):
  rng = np.random.default_rng(seed)
  w_T = jnp.asarray(rng.standard_normal((episodes, ways, dim)), jnp.float32)
  support = jnp.asarray(rng.standard_normal((episodes, ways * shots, dim)), jnp.float32)
  labels = jnp.asarray(np.tile(np.arange(ways), (episodes, shots)), jnp.int32)
  return w_T, support, labels


def python_loop_sampler(model, variables, sched):
  """The baseline: the scan's step, jitted alone and called T times from Python.

  The step computes what one iteration of `sample_batch`'s scan computes (support statistics
  hoisted, the time embedding shared by the batch), so the ratio between the two is what the
  Python loop itself costs.
  """
  stats_fn = jax.jit(jax.vmap(prototypes.support_stats, in_axes=(0, 0, None)),
                     static_argnums=2)

  @jax.jit
  def step(w, t, stats):
    eps = jax.vmap(lambda w_b, s_b: model.apply(variables, w_b, t, s_b, method="denoise"))(
        w, stats)
    return diffusion.reverse_step(sched, w, eps, t)

  def run(w, support, labels):
    stats = stats_fn(support, labels, w.shape[1])
    for t in range(sched.num_steps - 1, -1, -1):
      w = step(w, t, stats)
    return w

  return run


def torch_loop_sampler(params, sched, threads):
  """A PyTorch eager sampler of the same network and update, episodes batched per step."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  p = {k: {n: torch.from_numpy(np.array(v)) for n, v in layer.items()}
       for k, layer in params.items()}
  lin = lambda name, x: x @ p[name]["kernel"] + p[name]["bias"]
  e_dim = p["time_emb1"]["kernel"].shape[0]
  freqs = torch.exp(-np.log(10000.0) * torch.arange(e_dim // 2, dtype=torch.float32)
                    / (e_dim // 2))
  coeff = torch.from_numpy(np.asarray(sched.remove_noise_coeff))
  recip = torch.from_numpy(np.asarray(sched.reciprocal_sqrt_alphas))
  softplus = torch.nn.functional.softplus

  def eps_fn(w, t, support, onehot):
    # Gradient of the summed support loss, recomputed every step as the original does.
    grad = 2 * (onehot.sum(1)[..., None] * w - onehot.transpose(1, 2) @ support)
    e = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])
    gate = torch.sigmoid(lin("time_scale_2", torch.relu(lin("time_scale_0", e))))
    x1 = softplus(lin("proto_inf1", grad) * lin("time_emb1", e))
    x2 = softplus(lin("proto_inf2", x1) * lin("time_emb2", e))
    x3 = softplus(lin("proto_inf3", x2) * lin("time_emb3", e)) + x2
    x4 = softplus(lin("proto_inf4", x3) * lin("time_emb4", e)) + x1
    x5 = lin("proto_inf5", x4) * lin("time_emb5", e) + grad
    return gate * grad + (1 - gate) * x5

  def run(w, support, labels):
    w, support = torch.from_numpy(np.asarray(w)), torch.from_numpy(np.asarray(support))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(np.asarray(labels)).long(),
                                         w.shape[1]).float()
    with torch.no_grad():
      for t in range(sched.num_steps - 1, -1, -1):
        w = (w - coeff[t] * eps_fn(w, float(t), support, onehot)) * recip[t]
    return w.numpy()

  return run


def time_it(fn, repeats):
  """Median wall time of `repeats` calls after one warm-up (compilation) call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--episodes", default="1,8,64,256",
                      help="comma-separated episode counts")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--ways", type=int, default=5)
  parser.add_argument("--shots", type=int, default=1)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch", action="store_true",
                      help="also time a PyTorch eager sampler (needs torch)")
  parser.add_argument("--out", default="benchmarks/results/sampling.json")
  args = parser.parse_args()

  sched = schedule.linear(num_steps=args.steps)
  model = tcunet.TCUNet(feature_dim=args.dim)
  w_T, support, labels = make_inputs(0, 1, args.ways, args.shots, args.dim)
  variables = model.init(jax.random.key(0), w_T[0], 0, support[0], labels[0])
  baseline = python_loop_sampler(model, variables, sched)
  torch_run = None
  if args.torch:
    torch_run = torch_loop_sampler(variables["params"], sched, threads=os.cpu_count())

  rows = []
  for episodes in [int(b) for b in args.episodes.split(",")]:
    w_T, support, labels = make_inputs(episodes, episodes, args.ways, args.shots, args.dim)
    scan = lambda: diffusion.sample_batch(model, variables, sched, w_T, support, labels)
    loop = lambda: baseline(w_T, support, labels)
    diff = float(jnp.abs(scan() - loop()).max())  # the two must agree before they are timed
    assert diff < 1e-3 * float(jnp.abs(scan()).max()), diff
    row = dict(episodes=episodes, scan_s=time_it(scan, args.repeats),
               loop_s=time_it(loop, args.repeats))
    if torch_run is not None:
      diff = float(np.abs(torch_run(w_T, support, labels) - np.asarray(scan())).max())
      assert diff < 1e-3 * float(jnp.abs(scan()).max()), diff
      row["torch_s"] = time_it(lambda: torch_run(w_T, support, labels), args.repeats)
    flops = sample_flops(model, episodes, args.ways, args.steps)
    row["flops"] = flops
    for name in ("scan", "loop", "torch"):
      if f"{name}_s" in row:
        row[f"{name}_episodes_per_s"] = episodes / row[f"{name}_s"]
        row[f"{name}_gflops"] = flops / row[f"{name}_s"] / 1e9
    row["scan_over_loop"] = row["loop_s"] / row["scan_s"]
    if "torch_s" in row:
      row["scan_over_torch"] = row["torch_s"] / row["scan_s"]
    rows.append(row)
    print(f"B={episodes:5d}  scan {row['scan_episodes_per_s']:9.2f} ep/s "
          f"({row['scan_gflops']:6.1f} GFLOP/s)  loop {row['loop_episodes_per_s']:9.2f} ep/s  "
          f"scan/loop {row['scan_over_loop']:5.2f}x"
          + (f"  torch {row['torch_episodes_per_s']:8.2f} ep/s  scan/torch "
             f"{row['scan_over_torch']:5.2f}x" if "torch_s" in row else ""), flush=True)

  result = dict(
      benchmark="sampling", steps=args.steps, ways=args.ways, shots=args.shots, dim=args.dim,
      repeats=args.repeats, rows=rows,
      device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
      cpu_count=os.cpu_count(), processor=platform.processor() or platform.machine(),
      jax_version=jax.__version__,
      date=time.strftime("%Y-%m-%d"))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(_markdown(result))
  print(f"wrote {out}")


def _markdown(result):
  has_torch = any("torch_s" in r for r in result["rows"])
  head = "| episodes | scan ep/s | scan GFLOP/s | loop ep/s | scan / loop |"
  rule = "|---:|---:|---:|---:|---:|"
  if has_torch:
    head += " torch ep/s | scan / torch |"
    rule += "---:|---:|"
  lines = [head, rule]
  for r in result["rows"]:
    line = (f"| {r['episodes']} | {r['scan_episodes_per_s']:.1f} | {r['scan_gflops']:.1f} | "
            f"{r['loop_episodes_per_s']:.1f} | {r['scan_over_loop']:.2f} |")
    if has_torch:
      line += f" {r['torch_episodes_per_s']:.1f} | {r['scan_over_torch']:.2f} |"
    lines.append(line)
  return "\n".join(lines)


if __name__ == "__main__":
  main()
