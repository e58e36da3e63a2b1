"""The pipeline command's `--config` flag: ml_collections' config file flag, with every mistake
one line at parse time and a repeated override replacing the earlier one.

    --config=configs/glyphs_conv4.py:shot=1     the file and its presets (after the colon)
    --config.train.steps=2000                   an override; repeated, the last one wins
    --config.train.shots='(1, 5)'               a tuple is given whole (or 1,5)
    --config.stages=train,eval                  bare words at commas: a tuple of strings

What ml_collections does differently, and why it is changed here:
- A missing config file becomes an error object that raises at first use, deep in a stage, as
  a traceback; a file that fails to import or whose get_config raises is a multi-line
  traceback. Here `config_lib.read_config_file` reads it and raises a one-line ConfigError.
- A misspelt override reads `'\\'stpes\\' Did you mean "steps"...'`; here `config_lib.
  check_override` names the whole field and the nearest one.
- A tuple field's override is an absl multi-flag whose repetitions are joined
  (`--config.train.shots=(1,) --config.train.shots=(5,)` gives (1, 5)); here a tuple parses as
  one value, as every other type does, so the last one wins.
- A tuple's elements are not type-checked (`--config.train.shots=abc` gives ('abc',)); here
  `check_overrides` compares them with the file's.
"""

from __future__ import annotations

import ast
import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

from metadiff_jax import config_lib
from metadiff_jax.errors import UserError


class _ConfigFileParser(flags.ArgumentParser):
  """Reads `--config=FILE[:PRESETS]` and checks the names of the `--config.*` overrides."""

  def __init__(self, sys_argv: list[str] | None = None):
    self.sys_argv = sys_argv  # the command line, for the overrides' names; sys.argv if None
    self.loaded = None  # the file's config before the overrides, for check_overrides

  def parse(self, argument):
    path, colon, arg = argument.partition(":")
    config = config_lib.read_config_file(path, arg if colon else None)
    for field in _override_names(sys.argv if self.sys_argv is None else self.sys_argv):
      config_lib.check_override(config, field, path)
    self.loaded = config.copy_and_resolve_references()
    config.lock()  # a misspelt field in code fails loudly too
    return config

  def flag_type(self):
    return "config object"


class _WholeTuple(flags.ArgumentParser):
  """A tuple field's override as one value: not ml_collections' TupleParser (which makes a
  multi-flag), but the same conversion (`(1, 5)`, `1,5`, `eval`, `"('train', 'eval')"`), and
  bare words split at commas (`train,eval`), which needs no shell quoting."""

  def parse(self, argument):
    if isinstance(argument, str) and "," in argument and not re.search(r"[()\[\]'\"]",
                                                                        argument):
      try:
        ast.literal_eval(argument)
      except (ValueError, SyntaxError):  # words, not literals: train,eval
        return tuple(_literal_or_word(w) for w in argument.split(",") if w.strip())
    return tuple_parser.TupleParser().parse(argument)

  def flag_type(self):
    return "tuple"


def define(flag_values: flags.FlagValues = flags.FLAGS,
           sys_argv: list[str] | None = None) -> flags.FlagHolder:
  """Defines `--config` (file, presets, `--config.*` overrides) on `flag_values`.

  Args:
    flag_values: where to define it (absl's global FLAGS; a test passes its own).
    sys_argv: the command line the overrides are read from; sys.argv where None.

  Returns:
    The flag's holder; its value is the locked ConfigDict with the overrides applied. Call
    `check_overrides` after parsing.
  """
  config_flags.register_flag_parser_for_type(tuple, _WholeTuple())
  holder = config_flags.DEFINE_config_file("config", None, "the config file (and presets)",
                                           flag_values=flag_values, lock_config=True,
                                           sys_argv=sys_argv)
  flag_values["config"].parser = _ConfigFileParser(sys_argv)
  return holder


def check_overrides(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Raises a ConfigError where a parsed override gives a tuple elements of another type than
  the file's (`--config.train.shots=abc`, which the stages' checks would meet as a traceback)."""
  flag = flag_values["config"]
  for field, value in config_flags.get_override_values(flag).items():
    config_lib.check_override_type(field, value, _value_at(flag.parser.loaded, field))


def error_line(error: Exception) -> str:
  """The one line a flag-parsing error reads: the UserError it wraps, or absl's own text."""
  cause = error
  while cause is not None:  # absl re-raises a parser's error as IllegalFlagValueError
    if isinstance(cause, UserError):
      return str(cause)
    cause = cause.__cause__ or cause.__context__
  if isinstance(error, KeyError) and error.args:  # str() of a KeyError is its repr
    return str(error.args[0])
  missing = re.search(r"Flag --(\w+) must have a value other than None", str(error))
  if missing:
    return f"--{missing.group(1)} is required (see --help)"
  return str(error)


def _override_names(argv) -> list[str]:
  """The fields that `--config.a.b=...` (or `--noconfig.a.b`) arguments set, flag files read."""
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
  except flags.Error:
    pass  # absl reports an unreadable flag file itself
  names = []
  for arg in argv[1:]:
    match = re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg)
    if match:
      names.append(match.group(1))
  return names


def _literal_or_word(text: str):
  text = text.strip()
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _value_at(config, field: str):
  """config's value at `field` ('train.shots'); None where the path does not lead to one."""
  for part in field.split("."):
    if not isinstance(config, ml_collections.ConfigDict) or part not in config:
      return None
    config = config[part]
  return config
