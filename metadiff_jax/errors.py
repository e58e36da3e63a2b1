"""The exceptions that carry a user's mistake, each as one actionable line.

Every problem a user can cause (a bad config field, a dataset not built, a missing earlier
stage, a checkpoint that does not fit, a loss that became NaN) raises a `UserError` whose
message is a single line naming what is wrong and what to do. `python -m metadiff_jax.main`
prints that line and exits with status 2; notebooks can catch the class.
"""


class UserError(ValueError):
  """A problem the user can fix, with a one-line message that says how."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
  """A config field, preset or value that cannot be used."""


class StageError(UserError):
  """A stage that cannot run: an earlier stage's output is missing or does not fit."""


class TrainingError(UserError):
  """Training that cannot go on, e.g. a NaN or infinite loss (the last good checkpoint is kept)."""
