"""The exceptions that carry a user's mistake, each as one actionable line, and how a command
prints them.

Every problem a user can cause (a bad config field, a dataset not built, a missing earlier
stage, a checkpoint that does not fit, a loss that became NaN) raises a `UserError` whose
message is a single line naming what is wrong and what to do; notebooks can catch the class.
Every command (`python -m metadiff_jax.main`, `.data`, `.predict`, `.import_torch`) prints it
with `report` as the last line of stderr, `error: <message>`, and exits with status 2; its own
usage mistakes go the same way through `ArgumentParser`. docs/ERRORS.md states the contract.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_STATUS = 2  # a problem the user can fix, as absl and argparse use for usage errors


class UserError(ValueError):
  """A problem the user can fix, with a one-line message that says how."""

  def __init__(self, message: str):
    super().__init__(one_line(message))


class ConfigError(UserError):
  """A config field, preset or value that cannot be used."""


class StageError(UserError):
  """A stage that cannot run: an earlier stage's output is missing or does not fit."""


class TrainingError(UserError):
  """Training that cannot go on, e.g. a NaN or infinite loss (the last good checkpoint is kept)."""


def one_line(text) -> str:
  """`text` with its whitespace (newlines included) collapsed and control characters made
  spaces, so that it prints as one clean line."""
  return " ".join("".join(c if c.isprintable() or c.isspace() else " "
                          for c in str(text)).split())


def report(error: BaseException | str) -> int:
  """Prints `error: <message>` as the last line of stderr; returns the exit status, 2.

  Commands report a UserError, and an OSError (a path that cannot be read or written, a full
  disk: the machine's state, not a bug of the project).

  Progress bars still open (a stage stopped mid-loop) are closed first and their line ended,
  and stdout and the log are flushed, so that nothing shares the error's line or follows it.
  """
  # Bars exist only where `metrics` was imported; errors itself stays free of it (the core
  # modules import errors, and the benchmarks keep their imports light).
  metrics = sys.modules.get("metadiff_jax.metrics")
  if metrics is not None:
    metrics.close_progress_bars()
  for handler in logging.getLogger().handlers:
    handler.flush()
  sys.stdout.flush()
  print(f"error: {one_line(_message(error))}", file=sys.stderr, flush=True)
  return EXIT_STATUS


def _message(error: BaseException | str) -> str:
  """The error's text; an OSError (a path that cannot be read or written, a full disk) as its
  path and reason, which its str() buries after an errno."""
  if isinstance(error, OSError) and error.strerror:
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    return (f"cannot use {paths}: {error.strerror}; check the path, its permissions and the "
            "free space" if paths else f"{error.strerror}; check the paths given")
  return str(error)


def exit_command(status: int):
  """Ends a command with `status`; after an error, no later log line can follow it."""
  if status:
    logging.disable(logging.CRITICAL)
  sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
  """argparse, with a usage mistake reported as one line, "error: ...", and exit status 2
  (argparse's own prints the usage first, so its last line starts with the program's name)."""

  def error(self, message: str):
    report(f"{message} (see {self.prog} --help)")
    exit_command(EXIT_STATUS)
