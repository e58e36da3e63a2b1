"""Episodes per second of the MetaDiff sampler (1000 steps), against the original's Python loop.

Times, 5-way 1-shot, D = 512, T = 1000 by default, at several episode counts B:

- `python_loop`: the original code's structure. A Python loop over the T steps calls a
  jitted single reverse step (episodes batched in the call by vmap) whose network computes
  the time embedding, the gate and the support-loss gradient (from the support set) inside
  the step, as the original's forward pass does.
- `scan_fp32`: `diffusion.sample_batch`, the whole reverse process as one compiled
  `lax.scan`, with the time features of all steps and the episodes' class statistics
  computed before the scan; default matmul precision (on GPUs, TF32 where the chip has it).
- `scan_fp32_highest`: the same with `precision="highest"` (true float32 matmuls).
- `scan_bf16`: the same with the network's layers in bfloat16 (`dtype=jnp.bfloat16`); the
  carried weights, the gradient and the update stay float32.
- `scan_fp32_k{K}`, `scan_bf16_k{K}` for each K of `--num_sampling_steps`: respaced samplers
  of K steps (Nichol & Dhariwal 2021, `schedule.respace`).
- `torch_eager` with `--torch`, where PyTorch imports: a PyTorch eager port of the same
  network and update (written from the reference formulas, checked equal to ours first).

The episodes are synthetic with class structure: class centres |N(0, I)| and features
|centre + noise * N(0, I)| (non-negative, like post-ReLU backbone features), with 15 queries
per class, so that cosine classification by the sampled prototypes is meaningful. For every
sampler the script reports the fraction of query predictions that differ from those of
`scan_fp32_highest` at all T steps, and the query accuracy. The denoiser is randomly
initialised, so these show numerical agreement, not what a trained denoiser achieves.

It imports only jax, flax, numpy and metadiff_jax's schedule, tcunet, diffusion and
prototypes, so it runs on an accelerator machine without the data stack.

Run:  python benchmarks/sampling.py --out benchmarks/results/sampling_cpu.json
GPU:  python benchmarks/sampling.py --episodes 1,1024,8192,65536 --baseline_max_episodes 8192
Figures: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import diffusion, prototypes, schedule, tcunet

import bench_common

REFERENCE = "scan_fp32_highest"


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


def make_episodes(seed: int, episodes: int, ways: int, shots: int, queries: int, dim: int,
                  noise: float, query_episodes: int):
  """Synthetic episodes with class structure, drawn on the default device.

  Returns:
    A dict of w_T [B, N, D] ~ N(0, I); support [B, N*shots, D] and support_labels [B, N*shots];
    query [A, N*queries, D] and query_labels [A, N*queries] for the first A = query_episodes
    episodes (queries only serve the agreement figures, and at large B would not fit).
  """

  @jax.jit
  def draw(key):
    k_centre, k_support, k_query, k_w = jax.random.split(key, 4)
    centres = jnp.abs(jax.random.normal(k_centre, (episodes, ways, dim)))
    labels = jnp.tile(jnp.arange(ways, dtype=jnp.int32), (episodes, shots))
    query_labels = jnp.tile(jnp.arange(ways, dtype=jnp.int32), (query_episodes, queries))
    pick = jax.vmap(lambda c, y: c[y])
    support = jnp.abs(pick(centres, labels)
                      + noise * jax.random.normal(k_support, labels.shape + (dim,)))
    query = jnp.abs(pick(centres[:query_episodes], query_labels)
                    + noise * jax.random.normal(k_query, query_labels.shape + (dim,)))
    w_T = jax.random.normal(k_w, (episodes, ways, dim))
    return dict(w_T=w_T, support=support, support_labels=labels, query=query,
                query_labels=query_labels)

  return draw(jax.random.key(seed))


def python_loop_sampler(model, variables, sched):
  """The baseline: the original's structure, a Python loop over jitted single steps.

  Each step runs the network's whole forward pass (`TCUNet.__call__`): the time embedding,
  the gate and the five block factors, and the support-loss gradient from the support set
  (class sums recomputed), vmapped over the episodes of the batch, then the update of Eq. 8.
  """

  @jax.jit
  def step(w, t, support, labels):
    eps = jax.vmap(model.apply, in_axes=(None, 0, None, 0, 0))(variables, w, t, support, labels)
    return diffusion.reverse_step(sched, w, eps, t)

  def run(w, support, labels):
    for t in range(sched.num_steps - 1, -1, -1):
      w = step(w, jnp.int32(t), support, labels)
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
  coeff = torch.from_numpy(np.array(sched.remove_noise_coeff))
  recip = torch.from_numpy(np.array(sched.reciprocal_sqrt_alphas))
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


def time_round_robin(fns, repeats):
  """{name: (median wall time, output)} of the functions `fns` {name: fn}.

  Each function is called once first (compiling, and giving the output); then the timed calls
  go round the functions `repeats` times, so that load from elsewhere on the machine spreads
  over all of them rather than landing on one.
  """
  outputs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(times[name]), outputs[name]) for name in fns}


def predictions(query, w0):
  """[A, Q] predicted classes of the queries by cosine similarity to the prototypes w0."""
  return np.asarray(jnp.argmax(prototypes.cosine_logits(query, w0), axis=-1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--episodes", default="1,8,64", help="comma-separated episode counts B")
  parser.add_argument("--steps", type=int, default=1000, help="T, the diffusion steps")
  parser.add_argument("--num_sampling_steps", default="",
                      help="comma-separated K < T: also time samplers respaced to K steps")
  parser.add_argument("--ways", type=int, default=5)
  parser.add_argument("--shots", type=int, default=1)
  parser.add_argument("--queries", type=int, default=15, help="queries per class")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--noise", type=float, default=1.5,
                      help="feature noise around the class centres (1.5: ~70%% accuracy)")
  parser.add_argument("--agreement_episodes", type=int, default=1024,
                      help="at most this many episodes get queries for the agreement figures")
  parser.add_argument("--baseline_max_episodes", type=int, default=None,
                      help="skip the Python-loop baseline above this many episodes")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--torch", action="store_true",
                      help="also time a PyTorch eager sampler (needs torch)")
  parser.add_argument("--out", default="benchmarks/results/sampling.json")
  args = parser.parse_args()

  sched = schedule.linear(num_steps=args.steps)
  model = tcunet.TCUNet(feature_dim=args.dim)
  ways, dim = args.ways, args.dim
  variables = model.init(jax.random.key(0), jnp.zeros((ways, dim)), 0,
                         jnp.zeros((ways * args.shots, dim)),
                         jnp.tile(jnp.arange(ways), args.shots))
  baseline = python_loop_sampler(model, variables, sched)
  torch_run = None
  if args.torch:
    torch_run = torch_loop_sampler(variables["params"], sched, threads=os.cpu_count())
  respaced = [int(k) for k in args.num_sampling_steps.split(",") if k]
  samplers = {  # name: (schedule, keyword arguments of sample_batch)
      "scan_fp32": (sched, {}),
      REFERENCE: (sched, dict(precision="highest")),
      "scan_bf16": (sched, dict(dtype=jnp.bfloat16)),
  }
  for k in respaced:
    samplers[f"scan_fp32_k{k}"] = (schedule.respace(sched, k), {})
    samplers[f"scan_bf16_k{k}"] = (schedule.respace(sched, k), dict(dtype=jnp.bfloat16))

  rows = []
  for episodes in [int(b) for b in args.episodes.split(",")]:
    agree = min(episodes, args.agreement_episodes)
    data = make_episodes(episodes, episodes, ways, args.shots, args.queries, dim, args.noise,
                         agree)
    inputs = (data["w_T"], data["support"], data["support_labels"])
    fns, steps = {}, {}
    for name, (sched_k, kwargs) in samplers.items():
      fns[name] = functools.partial(diffusion.sample_batch, model, variables, sched_k, *inputs,
                                    **kwargs)
      steps[name] = sched_k.num_steps
    if args.baseline_max_episodes is None or episodes <= args.baseline_max_episodes:
      fns["python_loop"] = functools.partial(baseline, *inputs)
      steps["python_loop"] = args.steps
    if torch_run is not None:
      fns["torch_eager"] = functools.partial(torch_run, *inputs)
      steps["torch_eager"] = args.steps
    runs = {name: (steps[name], seconds, jnp.asarray(w0))
            for name, (seconds, w0) in time_round_robin(fns, args.repeats).items()}

    reference = runs[REFERENCE][2]
    scale = float(jnp.abs(reference).max())
    ref_pred = predictions(data["query"], reference[:agree])
    loop_s = runs["python_loop"][1] if "python_loop" in runs else None
    for name in ["python_loop", "torch_eager", *samplers]:
      if name not in runs:
        continue
      num_steps, seconds, w0 = runs[name]
      pred = predictions(data["query"], w0[:agree])
      flops = sample_flops(model, episodes, ways, num_steps)
      row = dict(
          episodes=episodes, sampler=name, steps=num_steps, seconds=seconds,
          episodes_per_s=episodes / seconds, flops=flops, gflops=flops / seconds / 1e9,
          over_loop=None if loop_s is None else loop_s / seconds,
          max_rel_diff=float(jnp.abs(w0 - reference).max()) / scale,
          changed=float(np.mean(pred != ref_pred)),
          accuracy=float(np.mean(pred == np.asarray(data["query_labels"]))),
          agreement_episodes=agree)
      rows.append(row)
      print(f"B={episodes:6d} {name:18s} K={num_steps:4d} {row['episodes_per_s']:11.2f} ep/s "
            f"{row['gflops']:8.1f} GFLOP/s  changed {row['changed']:.4f}  "
            f"max rel diff {row['max_rel_diff']:.2e}"
            + ("" if loop_s is None else f"  x loop {row['over_loop']:.2f}"), flush=True)
    # The baselines compute the same reverse process as the scan; the ports must agree.
    for name in ("python_loop", "torch_eager"):
      if name in runs:
        diff = float(jnp.abs(runs[name][2] - runs["scan_fp32"][2]).max()) / scale
        if diff > 1e-2:
          print(f"WARNING: {name} differs from scan_fp32 by {diff:.2e} of the scale")

  result = dict(
      benchmark="sampling", steps=args.steps, num_sampling_steps=respaced, ways=ways,
      shots=args.shots, queries=args.queries, dim=dim, noise=args.noise, repeats=args.repeats,
      reference=REFERENCE, rows=rows,
      **bench_common.machine(), device_count=jax.device_count(),
      flax_version=flax.__version__, numpy_version=np.__version__)
  out = bench_common.write_json(args.out, result)
  print(_markdown(result))
  print(f"wrote {out}")


def _markdown(result):
  lines = [
      f"{result['device']} ({result['platform']}), jax {result['jax_version']}, "
      f"{result['ways']}-way {result['shots']}-shot, D = {result['dim']}, "
      f"T = {result['steps']}; changed: query predictions that differ from "
      f"{result['reference']}'s",
      "",
      "| episodes | sampler | steps | ep/s | GFLOP/s | x loop | changed | accuracy |",
      "|---:|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    over = "" if r["over_loop"] is None else f"{r['over_loop']:.2f}"
    lines.append(
        f"| {r['episodes']} | {r['sampler']} | {r['steps']} | {r['episodes_per_s']:,.1f} | "
        f"{r['gflops']:.1f} | {over} | {r['changed']:.4f} | {r['accuracy']:.3f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
