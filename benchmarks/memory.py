"""Peak device memory against the episode batch: the sampler and a diffusion training step.

For each episode count B it compiles, without running them:
(a) the sampler `diffusion.sample_batch` (T reverse steps, N-way K-shot, D features), which
    carries only the current weights through its `lax.scan`;
(b) one diffusion training step: `value_and_grad` of `diffusion.loss`, the Adam update and the
    EMA, as one step of `method.train_steps` (the state donated, as there; the support
    features and targets are inputs here rather than gathered from the feature cache);
and, in the same process, the baseline (c): the sampler keeping its whole trajectory
(`sample_batch(..., trajectory_every=1)`, [B, T + 1, N, D]), which is what a loop storing every
step's weights holds. The memory of each is read from the compiled executable's
`memory_analysis()`: arguments + outputs + temporaries - aliased (donated) bytes, the buffers
live while it runs; this works on every backend. Where the backend reports allocator statistics
(GPU, TPU), each program also runs once in a fresh subprocess (so that the allocator's
never-reset peak is its own) and `device.memory_stats()["peak_bytes_in_use"]` is recorded.
All three programs also run once at the smallest B here, to check that they execute.

Writes the JSON (`--out`), a log-log plot of MiB against episodes next to it (same stem, .png;
needs matplotlib, skipped with a note where it is missing) and prints a Markdown table.

Run (CPU, compile only, well under a minute):  python benchmarks/memory.py
Full size on a GPU: the same defaults (D = 512, T = 1000, B = 1, 8, 64, 512) with
  --out benchmarks/results/memory_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

# Worker subprocesses measure their own allocator peak; a parent that preallocates most of the
# GPU (JAX's default) would leave them too little. Set before JAX initialises its backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (after the environment above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from metadiff_jax import diffusion, schedule, tcunet  # noqa: E402
from metadiff_jax.train_state import DiffusionState, adam_l2  # noqa: E402

import bench_common  # noqa: E402

KINDS = ("sampler", "trajectory", "train_step")
MIB = 2.0**20


class Programs:
  """The three programs of the benchmark for one (T, N, K, D), and their inputs."""

  def __init__(self, steps: int, ways: int, shots: int, dim: int):
    self.ways, self.shots, self.dim = ways, shots, dim
    self.model = tcunet.TCUNet(feature_dim=dim)
    self.sched = schedule.linear(num_steps=steps)
    variables = self.model.init(jax.random.key(0), jnp.zeros((ways, dim)), 0,
                                jnp.zeros((ways * shots, dim)),
                                jnp.repeat(jnp.arange(ways), shots))
    self.variables = variables
    # The train stage's optimiser (Adam with L2 added to the gradient; the rates do not change
    # the memory), made once: a state's optimiser is static, and a new one would recompile.
    self.tx = adam_l2(1e-3, 5e-4)
    model = self.model

    # Our own jit around the public entry point: its compiled executable is the whole
    # sampler (the inner jitted function inlines), whatever `sample_batch` does inside. The
    # schedule is an argument, so its arrays are not baked in as constants.
    self.jitted = {
        "sampler": jax.jit(lambda v, sc, w, s, y: diffusion.sample_batch(model, v, sc, w, s, y)),
        "trajectory": jax.jit(lambda v, sc, w, s, y: diffusion.sample_batch(
            model, v, sc, w, s, y, trajectory_every=1)),
        # One step of `method.train_steps`'s scan body, with the train stage's EMA
        # settings (decay 0.999 after 2,000 copied steps).
        "train_step": jax.jit(bench_common.diffusion_train_step(model, 0.999),
                              donate_argnums=(0,)),
    }

  def state(self) -> DiffusionState:
    """A fresh Adam + EMA state (the train step donates it)."""
    params = self.variables["params"]
    return DiffusionState.create(apply_fn=self.model.apply, params=params, tx=self.tx,
                                 ema_params=jax.tree_util.tree_map(jnp.copy, params))

  def inputs(self, kind: str, episodes: int, concrete: bool = False) -> tuple:
    """The arguments of program `kind` at `episodes` episodes: shapes, or arrays if concrete."""
    n, s, d = self.ways, self.ways * self.shots, self.dim
    if concrete:
      rng = np.random.default_rng(episodes)
      weights = jnp.asarray(rng.standard_normal((episodes, n, d)), jnp.float32)
      support = jnp.asarray(rng.standard_normal((episodes, s, d)), jnp.float32)
      labels = jnp.asarray(np.tile(np.arange(n), (episodes, self.shots)), jnp.int32)
    else:
      weights = jax.ShapeDtypeStruct((episodes, n, d), jnp.float32)
      support = jax.ShapeDtypeStruct((episodes, s, d), jnp.float32)
      labels = jax.ShapeDtypeStruct((episodes, s), jnp.int32)
    if kind == "train_step":
      return (self.state(), self.sched, weights, support, labels, jax.random.key(episodes))
    return (self.variables, self.sched, weights, support, labels)

  def compile(self, kind: str, episodes: int):
    return self.jitted[kind].lower(*self.inputs(kind, episodes)).compile()


def memory_of(compiled) -> dict:
  """Bytes of a compiled executable's buffers, from `memory_analysis()`."""
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory_analysis()")
  out = {
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "temp_bytes": int(m.temp_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
      "generated_code_bytes": int(m.generated_code_size_in_bytes),
  }
  # Donated arguments that become outputs share their buffers: count them once.
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out


def reports_peak() -> bool:
  """Whether the default device's allocator reports `peak_bytes_in_use` (not on CPU)."""
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return bool(stats) and "peak_bytes_in_use" in stats


def run_once(programs: Programs, kind: str, episodes: int, compiled=None) -> dict:
  """Runs program `kind` once on random inputs; checks its outputs are finite.

  `compiled`, the executable for these shapes if there is one, saves compiling it again
  (`lower().compile()` does not fill the jit cache).
  """
  args = programs.inputs(kind, episodes, concrete=True)
  out = jax.block_until_ready((compiled or programs.jitted[kind])(*args))
  leaves = jax.tree_util.tree_leaves(out[1] if kind == "train_step" else out)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  shapes = [list(x.shape) for x in leaves]
  return {"finite": finite, "output_shapes": shapes}


def worker(args) -> None:
  """Subprocess mode: run one program once, print the allocator's peak as a JSON line."""
  programs = Programs(args.steps, args.ways, args.shots, args.dim)
  stats = lambda: jax.devices()[0].memory_stats() or {}  # None on CPU: null figures
  before = stats().get("bytes_in_use")
  check = run_once(programs, args.worker, args.worker_episodes)
  print(json.dumps({"peak_bytes_in_use": stats().get("peak_bytes_in_use"),
                    "bytes_in_use_before": before, "finite": check["finite"]}))


def measure_peak(args, kind: str, episodes: int) -> dict:
  """The allocator's peak of program `kind` run once in a fresh process."""
  cmd = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--ways",
         str(args.ways), "--shots", str(args.shots), "--dim", str(args.dim), "--worker", kind,
         "--worker_episodes", str(episodes)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0]}"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--episodes", default="1,8,64,512", help="comma-separated batch sizes")
  parser.add_argument("--steps", type=int, default=1000, help="T, the reverse steps")
  parser.add_argument("--ways", type=int, default=5)
  parser.add_argument("--shots", type=int, default=1)
  parser.add_argument("--dim", type=int, default=512, help="D, the feature width")
  parser.add_argument("--peak", default="auto", choices=("auto", "on", "off"),
                      help="auto: also run each program in a subprocess and record the "
                           "allocator's peak where the backend reports it (GPU, TPU); on: "
                           "run the subprocesses anyway (null peaks on CPU)")
  parser.add_argument("--out", default="benchmarks/results/memory.json")
  parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
  parser.add_argument("--worker_episodes", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  batches = sorted({int(b) for b in args.episodes.split(",")})
  programs = Programs(args.steps, args.ways, args.shots, args.dim)
  with_peak = args.peak == "on" or (args.peak == "auto" and reports_peak())

  rows, smallest = [], {}
  for episodes in batches:
    row = {"episodes": episodes}
    for kind in KINDS:
      start = time.perf_counter()
      compiled = programs.compile(kind, episodes)
      row[kind] = memory_of(compiled)
      row[kind]["compile_s"] = time.perf_counter() - start
      if episodes == batches[0]:
        smallest[kind] = compiled
      if with_peak:
        row[kind].update(measure_peak(args, kind, episodes))
    row["trajectory_over_sampler"] = (row["trajectory"]["total_bytes"]
                                      / row["sampler"]["total_bytes"])
    if with_peak and all(row[k].get("peak_bytes_in_use") for k in ("sampler", "trajectory")):
      row["trajectory_over_sampler_peak"] = (row["trajectory"]["peak_bytes_in_use"]
                                             / row["sampler"]["peak_bytes_in_use"])
    rows.append(row)
    print(f"B={episodes:5d}  sampler {row['sampler']['total_bytes'] / MIB:10.2f} MiB  "
          f"trajectory {row['trajectory']['total_bytes'] / MIB:10.2f} MiB  "
          f"train step {row['train_step']['total_bytes'] / MIB:10.2f} MiB", flush=True)

  # Compiling is not running: run each program once, at the smallest size.
  executed = {kind: run_once(programs, kind, batches[0], smallest[kind]) for kind in KINDS}
  if not all(e["finite"] for e in executed.values()):
    raise SystemExit(f"a program gave non-finite outputs at B = {batches[0]}: {executed}")

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  plot = _plot(rows, out.with_suffix(".png"), args)
  result = dict(
      benchmark="memory", steps=args.steps, ways=args.ways, shots=args.shots, dim=args.dim,
      episodes=batches, rows=rows, peak_measured=with_peak,
      executed={"episodes": batches[0], **executed}, plot=plot,
      trajectory_output_bytes=[b * (args.steps + 1) * args.ways * args.dim * 4 for b in batches],
      **bench_common.machine())
  bench_common.write_json(out, result)
  print(f"{result['device']} ({result['platform']}); T = {args.steps}, {args.ways}-way "
        f"{args.shots}-shot, D = {args.dim}; compiled memory_analysis() "
        f"(arguments + outputs + temporaries - aliased)"
        + ("; peak: allocator's peak_bytes_in_use of one run" if with_peak else ""))
  print(_markdown(result))
  print(f"wrote {out}" + (f" and {plot}" if plot else " (no plot: matplotlib is missing)"))


def _plot(rows, path: pathlib.Path, args) -> str | None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  episodes = [r["episodes"] for r in rows]
  labels = {"sampler": "sampler (scan, final weights only)",
            "trajectory": "baseline: sampler keeping the trajectory",
            "train_step": "training step (loss, grad, Adam, EMA)"}
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for kind, color in zip(KINDS, ("C0", "C3", "C2")):
    ax.plot(episodes, [r[kind]["total_bytes"] / MIB for r in rows], "o-", color=color,
            label=labels[kind])
    peaks = [r[kind].get("peak_bytes_in_use") for r in rows]
    if all(p for p in peaks):
      ax.plot(episodes, [p / MIB for p in peaks], "x--", color=color, alpha=0.6,
              label=f"{kind}: measured peak")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("episodes per batch")
  ax.set_ylabel("device memory (MiB)")
  ax.set_title(f"T = {args.steps}, {args.ways}-way {args.shots}-shot, D = {args.dim} "
               f"({jax.default_backend()})")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return str(path)


def _markdown(result) -> str:
  peak = result["peak_measured"]
  head = ("| episodes | sampler MiB | trajectory-keeping sampler MiB (baseline) | "
          "baseline / sampler | train step MiB |")
  rule = "|---:|---:|---:|---:|---:|"
  if peak:
    head += " sampler peak MiB | baseline peak MiB | train step peak MiB |"
    rule += "---:|---:|---:|"
  lines = [head, rule]
  mib = lambda r, k, f="total_bytes": (f"{r[k][f] / MIB:,.2f}" if r[k].get(f) else "-")
  for r in result["rows"]:
    line = (f"| {r['episodes']} | {mib(r, 'sampler')} | {mib(r, 'trajectory')} | "
            f"{r['trajectory_over_sampler']:,.1f}x | {mib(r, 'train_step')} |")
    if peak:
      line += "".join(f" {mib(r, k, 'peak_bytes_in_use')} |" for k in KINDS)
    lines.append(line)
  return "\n".join(lines)


if __name__ == "__main__":
  main()
