"""Test accuracy against the number of reverse steps, for a trained run's denoiser.

Two curves on the same test episodes and starting noise:

- respaced: the sampler respaced to K of the T steps (`schedule.respace`, Nichol & Dhariwal
  2021), for each K given; its time per episode is measured too;
- trajectory: the full T-step sampler, with the accuracy of its prototypes after every
  `--every` steps (the paper's Figure 4 reports that the full process converges by about 450
  of its 1000 steps).

It reads a finished run (the train stage's best denoiser and the test features in the
workdir) and writes JSON, a Markdown table and a PNG plot next to `--out`.

Run:  python benchmarks/accuracy_vs_steps.py --config configs/glyphs_conv4.py \
          --workdir runs/glyphs_conv4 --shots 1 --out benchmarks/results/accuracy_vs_steps_glyphs_1shot.json
(with `--override section.field=value` for each --config.section.field the run was given).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import diffusion, embedding, method, metrics, prototypes, schedule
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import episodes as episodes_lib

import bench_common


def load_config(path: str, arg: str | None, overrides=()):
  """The config file's config with `section.field=value` overrides (values as Python
  literals, else strings), as the run's --config.section.field flags gave them."""
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for item in overrides:
    name, value = item.split("=", 1)
    *sections, field = name.split(".")
    node = config
    for section in sections:
      node = node[section]
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    node[field] = value
  return config


def trajectory_accuracy(model, variables, sched, features_dev, eps, key, ways, every,
                        update="original"):
  """[T // every + 1] mean accuracy of the prototypes after 0, every, 2 every, ... steps."""

  @jax.jit
  def run(support_idx, support_labels, query_idx, query_labels, index):
    support = jnp.take(features_dev, support_idx, axis=0)
    query = jnp.take(features_dev, query_idx, axis=0)
    dim = features_dev.shape[-1]
    w_T = method.episode_w_T(key, index, ways, dim)
    _, trajectory = diffusion.sample_batch(
        model, variables, sched, w_T, support, support_labels, trajectory_every=every,
        sampler=update, noise_keys=method.episode_noise_keys(key, index))
    logits = prototypes.cosine_logits(query[:, None], trajectory, scale=10.0)  # [B, J, Q, N]
    return jnp.mean(jnp.argmax(logits, -1) == query_labels[:, None], axis=(0, 2))

  return np.asarray(run(eps.support, eps.support_labels, eps.query, eps.query_labels,
                        eps.index.astype(np.int32)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="the run's config file")
  parser.add_argument("--config_arg", default=None, help="its presets, e.g. shot=1")
  parser.add_argument("--override", action="append", default=[],
                      help="section.field=value, as the run's --config.section.field=value")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--shots", type=int, default=1)
  parser.add_argument("--steps", default="1,2,5,10,25,50,100,250,450,1000",
                      help="K values of the respaced sampler")
  parser.add_argument("--every", type=int, default=50, help="trajectory resolution")
  parser.add_argument("--episodes", type=int, default=600)
  parser.add_argument("--batch_episodes", type=int, default=200)
  parser.add_argument("--out", default="benchmarks/results/accuracy_vs_steps.json")
  args = parser.parse_args()

  config = load_config(args.config, args.config_arg, args.override)
  test = embedding.diffusion_features(
      config, workdir_lib.pretrained_features(config, args.workdir, "test", progress=False))
  metadiff, state, _, meta = workdir_lib.load_denoiser(config, args.workdir, args.shots,
                                                       test.features.shape[1])
  variables = {"params": state.ema_params}
  e = config.eval
  sampler = episodes_lib.EpisodeSampler(test.labels, e.ways, args.shots, e.queries,
                                        config.seed, "test")
  key = metadiff.key("sampling", 2)  # the eval stage's starting noise
  full = metadiff.train_schedule
  features_dev = jnp.asarray(test.features)

  respaced = []
  for k in [int(x) for x in args.steps.split(",") if int(x) <= full.num_steps]:
    respaced_method = dataclasses.replace(metadiff, sample_schedule=schedule.respace(full, k))
    run = lambda m=respaced_method: m.evaluate(variables, features_dev, sampler, args.episodes,
                                               args.batch_episodes, key, progress=False)
    run()  # compiles
    start = time.perf_counter()
    m = run()
    seconds = time.perf_counter() - start
    row = {"num_sampling_steps": k, **metrics.summarize(m["accuracy"]),
           "norm_ratio": float(m["norm_ratio"].mean()),
           "seconds_per_episode": seconds / args.episodes}
    respaced.append(row)
    print(f"K={k:5d}  accuracy {100 * row['mean']:.2f} ± {100 * row['ci95']:.2f}%  norm ratio "
          f"{row['norm_ratio']:.3g}  {1e3 * row['seconds_per_episode']:.2f} ms/episode",
          flush=True)

  eps = sampler.batch(0, args.episodes)
  traj = trajectory_accuracy(metadiff.model, variables, full, features_dev, eps, key, e.ways,
                             args.every, config.diffusion.sampler)
  trajectory = [{"steps_taken": j * args.every, "accuracy": float(a)} for j, a in
                enumerate(traj)]
  print("trajectory:", " ".join(f"{t['steps_taken']}:{100 * t['accuracy']:.1f}"
                                for t in trajectory))

  result = dict(benchmark="accuracy_vs_steps", config=args.config, workdir=args.workdir,
                shots=args.shots, ways=e.ways, episodes=args.episodes, T=full.num_steps,
                checkpoint_step=int(state.step), checkpoint_validation=meta,
                respaced=respaced, trajectory=trajectory, **bench_common.machine())
  out = bench_common.write_json(args.out, result)
  table = markdown(result)
  out.with_suffix(".md").write_text(table + "\n")
  plot(result, out.with_suffix(".png"))
  print(table)
  print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


def markdown(result):
  lines = [f"Respaced sampler, {result['ways']}-way {result['shots']}-shot, "
           f"{result['episodes']} test episodes (T = {result['T']}):", "",
           "| sampling steps K | accuracy | norm ratio | ms / episode |", "|---:|---:|---:|---:|"]
  for r in result["respaced"]:
    lines.append(f"| {r['num_sampling_steps']} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}% "
                 f"| {r['norm_ratio']:.3g} | {1e3 * r['seconds_per_episode']:.2f} |")
  lines += ["", "Full sampler, accuracy after j of its steps:", "",
            "| j | " + " | ".join(str(t["steps_taken"]) for t in result["trajectory"]) + " |",
            "|---|" + "---:|" * len(result["trajectory"]),
            "| accuracy | " + " | ".join(f"{100 * t['accuracy']:.1f}"
                                          for t in result["trajectory"]) + " |"]
  return "\n".join(lines)


def plot(result, path):
  records = ([{"step": r["num_sampling_steps"], "respaced: accuracy after K steps": r["mean"]}
              for r in result["respaced"]]
             + [{"step": t["steps_taken"], "full sampler: accuracy after j steps": t["accuracy"]}
                for t in result["trajectory"]])
  metrics.plot_curves(records, ["respaced: accuracy after K steps",
                                "full sampler: accuracy after j steps"], str(path),
                      title=f"{result['ways']}-way {result['shots']}-shot test accuracy vs "
                            "reverse steps", xlabel="steps")


if __name__ == "__main__":
  main()
