"""Runs the MetaDiff pipeline: `python -m metadiff_jax.main --config configs/<name>.py --workdir DIR`.

Intentionally short: it parses the flags, starts `jax.distributed` where the run has several
processes (`mesh.initialize_distributed`), logs the devices and calls the stages
(`metadiff_jax.stages.run`), which a notebook can call directly without flags.

    --config=configs/glyphs_conv4.py:shot=1     a config file with its presets
    --config.train.steps=2000                   a field override (the config is locked;
                                                repeated, the last one wins)
    --config.stages="('train', 'eval')"         run only some stages (a tuple is given whole)
    --workdir=DIR                               where checkpoints, features and results go
    --coordinator_address=127.0.0.1:1234 --num_processes=2 --process_id=0
                                                one of several processes (launch/local.sh)

A problem the user can fix (a config file that is missing or does not load, a misspelt field,
a dataset not built, a missing earlier stage, a NaN loss) ends the run with one line,
`error: ...`, as the last line of stderr and exit status 2; what was saved before stays
(docs/ERRORS.md).
"""

from __future__ import annotations

import logging as pylogging

from absl import app, flags, logging

from metadiff_jax import config_flag, errors, mesh, stages
from metadiff_jax.errors import UserError


_CONFIG = config_flag.define()
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's directory")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0, to start jax.distributed explicitly (a local multi-process run "
    "or a cluster JAX does not detect); TPU slices, SLURM and Open MPI need none")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..N-1")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops the INFO chatter of Orbax and TFDS (each save logs a dozen lines); keeps warnings."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    noisy = ("/orbax/", "/tensorflow_datasets/", "/etils/")
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in noisy)


def main(argv) -> None:
  del argv  # _parse_flags leaves none
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    mesh.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    _fail(e)
  if not mesh.is_writer():  # only process 0 logs; the others report warnings and errors
    logging.set_verbosity(logging.WARNING)
  try:
    stages.run(_CONFIG.value, _WORKDIR.value)
  except (UserError, OSError) as e:  # OSError: a full disk, a path that cannot be written
    _fail(e)


def _fail(error) -> None:
  logging.flush()
  errors.exit_command(errors.report(error))


def _parse_flags(argv):
  """absl's flag parsing, with config mistakes reported in one line (exit status 2)."""
  try:
    rest = flags.FLAGS(argv)
    config_flag.check_overrides()
  except Exception as e:  # noqa: BLE001  (flag and config errors arrive as several types)
    _fail(config_flag.error_line(e))
  if len(rest) > 1:
    _fail(f"unexpected arguments: {' '.join(rest[1:])}; every option reads --name=value "
          "(see --help)")
  return rest


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
