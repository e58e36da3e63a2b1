"""The one exception type of the data stack.

Every problem with a user's files (missing, truncated, corrupt, wrong layout, wrong counts) and
every impossible request (an episode a split cannot supply) raises `DataError` with a single-line
message that names the file or the numbers and says what to do. The command-line entry points
print that line and exit with status 2; library callers can catch it.
"""


class DataError(ValueError):
  """A dataset file or an episode request that cannot be used, with a one-line fix."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))
