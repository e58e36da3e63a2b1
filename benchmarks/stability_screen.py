"""Screening of denoiser variants on a workdir's features, on validation episodes.

The stability stage (`configs/stability.py`) measures the variants that make the study's
tables on the test episodes; this script screens the candidates that do not need a variant of
their own, so that what is chosen is chosen on validation episodes and the test episodes
only report it (docs/STABILITY.md, "How the candidates were screened"):

- the diffusion targets: each base class's mean over all its images (`--targets all`, the
  prototypes stage's) or over the images not in the episode's support set (`held_out`);
- the number of reverse steps: the sampler respaced to each K of `--sampling_steps`;
- averaging the prototypes of several reverse samples (`--average`), each from its own w_T;
- for the residual predictions, the prior alone (the network's correction left out).

It trains one denoiser of `--variant` in memory (no checkpoints), evaluates its EMA
parameters every `--every` steps, and writes JSON and a Markdown table next to `--out`.

Run:  python benchmarks/stability_screen.py --config configs/textures_conv4.py \\
          --workdir runs/textures_conv4 --variant linear_prior --shots 1 --steps 5000 \\
          --out benchmarks/results/screen_textures_1shot.json
(the workdir needs the pretrain and prototypes stages; `--override section.field=value` for
each --config.section.field the run was given).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from metadiff_jax import config_lib, embedding, heads, mesh, method, metrics, rng, tcunet
from metadiff_jax import workdir as workdir_lib
from metadiff_jax.data import episodes as episodes_lib
from metadiff_jax.train_state import diffusion_step

import bench_common
from accuracy_vs_steps import load_config

TARGETS = ("all", "held_out")


@functools.partial(jax.jit, static_argnames=("metadiff", "num_steps", "episodes", "ways",
                                             "shots"), donate_argnums=(1,))
def held_out_steps(metadiff, state, features_dev, targets, table, episode_key, key,
                   num_steps: int, episodes: int, ways: int, shots: int):
  """`method.train_steps` with each episode's target its classes' means over the images not
  in its support set: (n_c mean_c - K m_hat_c) / (n_c - K)."""
  labels = jnp.broadcast_to(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), shots),
                            (episodes, ways * shots))
  draw = jax.vmap(episodes_lib.draw_support, in_axes=(None, None, 0, None, None))

  def one_step(state, _):
    index = state.step * episodes + jnp.arange(episodes)
    idx, classes = draw(table, episode_key, index, ways, shots)
    support = jnp.take(features_dev, idx, axis=0)
    counts = jnp.take(table.counts, classes, axis=0)[..., None].astype(jnp.float32)
    m_hat = support.reshape(episodes, ways, shots, -1).mean(2)
    w0 = (counts * jnp.take(targets, classes, axis=0) - shots * m_hat) / (counts - shots)
    return diffusion_step(metadiff.model, state, metadiff.train_schedule, w0, support, labels,
                          key, metadiff.ema_decay, metadiff.ema_start_step)

  return jax.lax.scan(one_step, state, None, length=num_steps)


def respaced(config, dim: int, k: int | None) -> method.MetaDiff:
  c = config.copy_and_resolve_references()
  c.diffusion.num_sampling_steps = k
  return method.MetaDiff.from_config(c, dim)


def _accuracy(protos, query, labels):
  return np.asarray(jax.vmap(functools.partial(heads.accuracy, "prototype"))(
      protos, query, jnp.asarray(labels)))


def averaged_accuracy(metadiff, variables, features_dev, episodes, key, samples: int,
                      ways: int):
  """Accuracy [B] of the mean of `samples` reverse samples' prototypes (sample j starts from
  w_T drawn under fold_in(key, j); j = 0 is the evaluation's own w_T)."""
  support = jnp.take(features_dev, jnp.asarray(episodes.support), axis=0)
  query = jnp.take(features_dev, jnp.asarray(episodes.query), axis=0)
  index = jnp.asarray(episodes.index)
  draws = []
  for j in range(samples):
    k = key if j == 0 else jax.random.fold_in(key, 10_000 + j)
    w_T = method.episode_w_T(k, index, ways, metadiff.model.feature_dim)
    draws.append(metadiff.sample(variables, w_T, support, jnp.asarray(episodes.support_labels)))
  protos = jnp.mean(jnp.stack(draws), axis=0)
  spread = float(jnp.mean(jnp.linalg.norm(draws[0] - draws[-1], axis=-1)))
  return _accuracy(protos, query, episodes.query_labels), spread


def prior_accuracy(metadiff, variables, features_dev, episodes, ways: int):
  """Accuracy [B] of the residual predictions' prior alone (no correction, no sampling)."""
  support = jnp.take(features_dev, jnp.asarray(episodes.support), axis=0)
  query = jnp.take(features_dev, jnp.asarray(episodes.query), axis=0)
  labels = jnp.asarray(episodes.support_labels)
  cond = jax.vmap(lambda s, y: tcunet.condition("prototype", "l2", s, y, ways))(support, labels)
  prior = metadiff.model.apply(variables, cond, ways, 3, method="prior")
  return _accuracy(prior, query, episodes.query_labels)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--config_arg", default=None, help="the text after the config's colon")
  parser.add_argument("--override", action="append", default=[],
                      help="section.field=value, as --config.section.field=value")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variant", default=config_lib.RECOMMENDED,
                      choices=sorted(config_lib.VARIANTS))
  parser.add_argument("--shots", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3000, help="training steps")
  parser.add_argument("--every", type=int, default=1000, help="steps between evaluations")
  parser.add_argument("--episodes", type=int, default=300)
  parser.add_argument("--split", default="val", choices=("val", "test"))
  parser.add_argument("--targets", default="all", choices=TARGETS)
  parser.add_argument("--sampling_steps", default="1,10,100,T",
                      help="reverse step counts to compare at the end (T: all)")
  parser.add_argument("--average", default="1,4", help="samples averaged, at the end")
  parser.add_argument("--out", default=None, help="JSON path (a .md table is written beside)")
  args = parser.parse_args(argv)

  config = load_config(args.config, args.config_arg, args.override)
  config_lib.apply_variant(config, args.variant)
  root = args.workdir
  splits = ("train", args.split)
  data = {s: embedding.diffusion_features(config, fs) for s, fs in
          zip(splits, workdir_lib.pretrained_splits(config, root, splits, progress=False))}
  targets = workdir_lib.diffusion_targets(config, root, data["train"])
  dim = int(data["train"].features.shape[1])
  metadiff = method.MetaDiff.from_config(config, dim)
  shots, t = args.shots, config.train
  table = episodes_lib.class_table(data["train"].labels)
  episodes_lib.check_support_episodes(table, metadiff.ways, shots, "train")
  features_dev, targets_dev, table, eval_dev = mesh.replicate(
      (data["train"].features, np.asarray(targets, np.float32), table,
       data[args.split].features))
  episode_key = rng.key(config, "episodes", shots)
  key = rng.key(config, "diffusion", shots)
  sampler = episodes_lib.EpisodeSampler(data[args.split].labels, config.eval.ways, shots,
                                        config.eval.queries, config.seed, args.split)
  sample_key = rng.key(config, "sampling", 2)
  state = metadiff.init(shots)

  def evaluate(params, md=metadiff):
    m = md.evaluate({"params": params}, eval_dev, sampler, args.episodes,
                    config.eval.batch_episodes, sample_key, progress=False)
    return metrics.summarize(m["accuracy"]), float(np.mean(m["norm_ratio"])), \
        metrics.summarize(m["prototype_accuracy"])

  curve, start = [], time.time()
  acc, ratio, class_means = evaluate(state.params)
  curve.append({"step": 0, "accuracy": acc, "norm_ratio": ratio})
  done = 0
  while done < args.steps:
    n = min(args.every, args.steps - done)
    if args.targets == "held_out":
      state, losses = held_out_steps(metadiff, state, features_dev, targets_dev, table,
                                     episode_key, key, n, t.episodes_per_step, metadiff.ways,
                                     shots)
    else:
      state, losses = metadiff.train_steps(state, features_dev, targets_dev, table,
                                           episode_key, key, n, t.episodes_per_step, shots)
    done += n
    acc, ratio, _ = evaluate(state.ema_params)
    curve.append({"step": done, "loss": float(np.mean(losses)), "accuracy": acc,
                  "norm_ratio": ratio})
    print(f"step {done}: {100 * acc['mean']:.2f} +- {100 * acc['ci95']:.2f}% (class means "
          f"{100 * class_means['mean']:.2f}), norm ratio {ratio:.3g}, "
          f"{time.time() - start:.0f} s", flush=True)

  final = {}
  for k in args.sampling_steps.split(","):
    steps = None if k == "T" else int(k)
    final[f"sampling_steps={k}"] = evaluate(state.ema_params, respaced(config, dim, steps))[0]
  episodes = sampler.batch(0, args.episodes)
  for m in (int(x) for x in args.average.split(",")):
    acc, spread = averaged_accuracy(metadiff, {"params": state.ema_params}, eval_dev, episodes,
                                    sample_key, m, config.eval.ways)
    final[f"average={m}"] = {**metrics.summarize(acc), "spread": spread}
  if metadiff.model.prediction in tcunet.RESIDUAL_PREDICTIONS:
    final["prior_only"] = metrics.summarize(
        prior_accuracy(metadiff, {"params": state.ema_params}, eval_dev, episodes,
                       config.eval.ways))
  for name, r in final.items():
    print(f"{name}: {100 * r['mean']:.2f} +- {100 * r['ci95']:.2f}%", flush=True)

  result = {"benchmark": "stability_screen", "variant": args.variant, "shots": shots,
            "split": args.split, "episodes": args.episodes, "targets": args.targets,
            "train_steps": args.steps, "class_means": class_means, "curve": curve,
            "final": final, "config": args.config, "workdir": root,
            **bench_common.machine()}
  if args.out:
    path = bench_common.write_json(args.out, result)
    lines = [f"# Screening: {args.variant}, {shots}-shot, {args.split} episodes "
             f"({args.episodes}), targets {args.targets}, {args.steps} training steps", "",
             f"Class means: {100 * class_means['mean']:.2f} ± {100 * class_means['ci95']:.2f}%",
             "", "| setting | accuracy (%) |", "|---|---|"]
    lines += [f"| step {c['step']} | {100 * c['accuracy']['mean']:.2f} ± "
              f"{100 * c['accuracy']['ci95']:.2f} |" for c in curve]
    lines += [f"| {name} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} |"
              for name, r in final.items()]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", flush=True)
  return result


if __name__ == "__main__":
  main()
