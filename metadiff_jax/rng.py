"""The run's keys: one typed key per purpose, derived from config.seed.

Randomness is derived, not carried: each purpose folds its own tag into the seed's key, and
callers fold in what indexes the draw (a shot setting, a step, an episode), so a resumed or
re-sharded run draws what an uninterrupted one would.
"""

from __future__ import annotations

import jax

# Tags folded into the run's key, one per purpose, so that no two streams coincide.
KEY_TAGS = {"pretrain_init": 1, "pretrain_data": 2, "pretrain_dropout": 3, "prototypes": 4,
            "denoiser_init": 5, "diffusion": 6, "sampling": 7, "episodes": 8, "analysis": 9,
            "predict": 10}


def seed_key(seed: int, purpose: str, *fold: int) -> jax.Array:
  """The typed key of `purpose` under `seed`, with further integers folded in."""
  k = jax.random.fold_in(jax.random.key(seed), KEY_TAGS[purpose])
  for value in fold:
    k = jax.random.fold_in(k, value)
  return k


def key(config, purpose: str, *fold: int) -> jax.Array:
  """The typed key of `purpose` under config.seed, with further integers folded in."""
  return seed_key(config.seed, purpose, *fold)
