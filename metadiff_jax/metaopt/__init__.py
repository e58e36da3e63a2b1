"""The meta-optimizer baselines of the paper's analyses (Table 2; ALFA also in Table 4).

Each adapts a head's weights (`metadiff_jax.heads`) on one episode's support set by an
unrolled inner loop, and the bi-level ones are meta-trained by differentiating the query loss
through it:

- `GDA` (gda.py): Eq. 4 from random weights, optionally with momentum; nothing learned.
- `ANIL` (anil.py): a learned initialisation and inner learning rate (Raghu et al. 2020).
- `MetaLSTM` (metalstm.py): the LSTM meta-learner of Ravi & Larochelle (2017).
- `ALFA` (alfa.py): generated per-step learning rates and decays (Baik et al. 2020), from
  random weights.

The shared machinery (batches of episodes, the outer loss, the meta-training step and its
compiled memory) is in base.py. Build a method by name with `make("alfa", head=..., ...)`.
"""

from __future__ import annotations

from metadiff_jax.metaopt.alfa import ALFA
from metadiff_jax.metaopt.anil import ANIL
from metadiff_jax.metaopt.base import (MetaOptimizer, MetaState, adapt_batch, compiled_bytes,
                                       create_state, episode_accuracy, meta_train_step,
                                       outer_loss, train_step_memory)
from metadiff_jax.metaopt.gda import GDA
from metadiff_jax.metaopt.metalstm import MetaLSTM

METHODS = {"gda": GDA, "anil": ANIL, "metalstm": MetaLSTM, "alfa": ALFA}


def make(name: str, **fields) -> MetaOptimizer:
  """The method registered as `name` (a key of METHODS), built from keyword `fields`."""
  if name not in METHODS:
    raise ValueError(f"unknown meta-optimizer {name!r}: use one of {sorted(METHODS)}")
  return METHODS[name](**fields)


__all__ = ["ALFA", "ANIL", "GDA", "METHODS", "MetaLSTM", "MetaOptimizer", "MetaState",
           "adapt_batch", "compiled_bytes", "create_state", "episode_accuracy", "make",
           "meta_train_step", "outer_loss", "train_step_memory"]
