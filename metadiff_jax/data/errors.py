"""The one exception type of the data stack.

Every problem with a user's files (missing, truncated, corrupt, wrong layout, wrong counts) and
every impossible request (an episode a split cannot supply) raises `DataError` with a single-line
message that names the file or the numbers and says what to do. The command-line entry points
print that line and exit with status 2; library callers can catch it (or its base,
`metadiff_jax.errors.UserError`).
"""

from metadiff_jax.errors import UserError


class DataError(UserError):
  """A dataset file or an episode request that cannot be used, with a one-line fix."""
