"""Every command's error contract: a bad input ends with exit status 2 and one clean line,
`error: ...`, as the last line of stderr; no traceback, no progress bar or escape code on it,
no log line after it (docs/ERRORS.md).

The commands run in this process: those with a `main(argv)` (data, predict, import_torch)
through it, the pipeline's through its flag parsing (`main._parse_flags`, on absl's global
flags) and, for the config, on flags of its own (`tiny_pipeline.parse_command`). One
pipeline command runs in a process of its own, end to end.
"""

import logging
import sys

import pytest
import tqdm
from absl import flags

import data_fixtures as fx
from conftest import REPO
from metadiff_jax import config_lib, errors, main, metrics
from metadiff_jax import import_torch as import_torch_cli
from metadiff_jax import predict as predict_cli
from metadiff_jax.data import __main__ as data_cli
from tiny_pipeline import command_error, parse_command, run_main


def assert_one_error_line(status, stderr, message=""):
  """Exit status 2; stderr's last line is `error: ...` holding `message`, with no control
  character; no traceback. Returns that line."""
  assert status == 2, (status, stderr[-2000:])
  assert "Traceback" not in stderr, stderr[-2000:]
  last = stderr.rstrip().split("\n")[-1]  # split on newlines only: a \r must not hide
  assert last.startswith("error: "), stderr[-2000:]
  assert all(c.isprintable() for c in last), repr(last)
  assert message in last, last
  return last


def run_in_process(cli_main, argv, capsys):
  """(exit status, stdout, stderr) of `cli_main(argv)`; a usage error exits through argparse."""
  try:
    status = cli_main(argv)
  except SystemExit as e:
    status = e.code
  finally:
    logging.disable(logging.NOTSET)  # errors.exit_command silences logging for good
  out, err = capsys.readouterr()
  return status, out, err


# ----------------------------------------------------------------------------- pipeline

def test_the_pipeline_command_ends_with_one_error_line(tmp_path):
  """End to end, in a process of its own: the flags parse, the stages start, the first one's
  error is stderr's last line and the status 2."""
  proc = run_main("--config=configs/glyphs_conv4.py",
                  f"--config.data.data_dir={tmp_path / 'none'}", f"--workdir={tmp_path / 'run'}")
  last = assert_one_error_line(proc.returncode, proc.stderr, "is not built")
  assert "\\" not in last and "'" not in last.split(";")[0], last  # no escaped quotes


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py"], "error: config file configs/nope.py does not exist"),
    (["--config=configs/glyphs_conv4.py", "--config.train.stpes=3"],
     "error: unknown config field train.stpes in configs/glyphs_conv4.py; did you mean "
     "train.steps?"),
    (["--config=configs/glyphs_conv4.py", "extra"], "error: unexpected arguments: extra"),
])
def test_pipeline_flag_errors_are_the_last_line(args, message, tmp_path, monkeypatch, capsys):
  argv = ["metadiff_jax.main", *args, f"--workdir={tmp_path / 'run'}"]
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sys, "argv", argv)  # where the config flag reads the overrides' names
  try:
    status, _, err = run_in_process(main._parse_flags, argv, capsys)
  finally:
    flags.FLAGS.unparse_flags()
  last = assert_one_error_line(status, err, message)
  assert "\\" not in last and "'" not in last.split(";")[0], last  # no escaped quotes


def test_a_repeated_override_replaces_the_earlier_one():
  config = parse_command("--config=configs/glyphs_conv4.py", "--config.train.shots=(1,)",
                         "--config.train.shots=(5,)", "--config.train.steps=7",
                         "--config.train.steps=9")
  assert tuple(config.train.shots) == (5,) and config.train.steps == 9
  config = parse_command("--config=configs/glyphs_conv4.py", "--config.train.shots=(1, 5)",
                         "--config.stages=eval")
  assert tuple(config.train.shots) == (1, 5) and tuple(config.stages) == ("eval",)
  assert config.is_locked
  config = parse_command("--config=configs/glyphs_conv4.py", "--config.stages=train, eval",
                         "--config.train.shots=1,5", "--config.analysis.parts=('table2',)")
  assert tuple(config.stages) == ("train", "eval") and tuple(config.train.shots) == (1, 5)
  assert tuple(config.analysis.parts) == ("table2",)
  # A tuple's elements must have the file's type (the stages' checks would raise otherwise).
  text = parse_command("--config=configs/glyphs_conv4.py", "--config.train.shots=abc")
  assert text == ("--config.train.shots gives ('abc',), but config.train.shots holds int "
                  "values, like (1, 5)"), text
  config = parse_command("--config=configs/glyphs_conv4.py",
                         "--config.analysis.gda_learning_rates=(1, 0.5)")
  assert tuple(config.analysis.gda_learning_rates) == (1, 0.5)  # an int for a float is fine


@pytest.mark.parametrize("source, message", [
    ("def get_config(:\n  pass\n", "does not import: SyntaxError: invalid syntax (line 1)"),
    ("import no_such_module_here\n", "does not import: ModuleNotFoundError"),
    ("X = 1\n", "defines no get_config()"),
    ("def get_config(arg=None):\n  return 1 / 0\n",
     "failed: ZeroDivisionError: division by zero (line 2)"),
    ("def get_config(arg=None):\n  pass\n", "returned NoneType, not an ml_collections"),
])
def test_a_config_file_that_does_not_load_is_one_line(source, message, tmp_path):
  path = tmp_path / "mine.py"
  path.write_text(source)
  text = parse_command(f"--config={path}")
  assert isinstance(text, str) and message in text and "\n" not in text, text


def test_config_file_mistakes_name_the_fix(tmp_path):
  text = parse_command("--config=configs/glyphs_conv.py")
  assert "did you mean configs/glyphs_conv4.py?" in text, text
  assert "is a directory" in parse_command("--config=configs")
  assert "no config file given" in parse_command("--config=")
  (tmp_path / "plain.py").write_text(
      "import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({'a': 1})\n")
  assert "takes no argument, so it has no presets; drop ':x=1'" in parse_command(
      f"--config={tmp_path / 'plain.py'}:x=1")
  assert parse_command(f"--config={tmp_path / 'plain.py'}", "--config.a=2").a == 2
  # A preset the file does not have.
  assert "unknown config preset 'shots'" in parse_command(
      "--config=configs/glyphs_conv4.py:shots=1")
  assert "unknown dataset preset 'imagenet21k'" in parse_command(
      "--config=configs/paper_analysis.py:dataset=imagenet21k")
  # A misspelt section is corrected to the whole field; with nothing close, the fields show.
  assert "did you mean train.steps?" in parse_command(
      "--config=configs/glyphs_conv4.py", "--config.trian.steps=3")
  text = parse_command("--config=configs/glyphs_conv4.py", "--config.train.zzzz=3")
  assert "unknown config field train.zzzz" in text and "learning_rate, log_every_steps" in text


# ----------------------------------------------------------------------------- data

def test_data_command_errors_are_the_last_line(tmp_path, capsys):
  status, out, err = run_in_process(data_cli.main, [
      "build", "mini_imagenet", "--data_dir", str(tmp_path / "d"), "--manual_dir",
      str(tmp_path / "missing")], capsys)
  assert_one_error_line(status, err, "does not exist")
  assert "Downloading and preparing" not in out + err  # TFDS's banner
  status, _, err = run_in_process(data_cli.main, [
      "inspect", "glyphs", "--data_dir", str(tmp_path / "none")], capsys)
  assert_one_error_line(status, err, "build glyphs")
  status, _, err = run_in_process(data_cli.main, ["build"], capsys)
  assert_one_error_line(status, err, "error: the following arguments are required: name")
  assert err.count("\n") == 1  # argparse's usage text is not printed
  status, _, err = run_in_process(data_cli.main, [
      "build", "textures", "--data_dir", str(tmp_path / "d"), "--num_classes", "0"], capsys)
  assert_one_error_line(status, err, "num_classes must be positive, got 0")
  (tmp_path / "a_file").write_text("")
  status, _, err = run_in_process(data_cli.main, [
      "build", "glyphs", "--data_dir", str(tmp_path / "a_file" / "d")], capsys)
  assert_one_error_line(status, err, f"error: cannot use {tmp_path / 'a_file'}")


def test_a_build_that_fails_midway_leaves_no_bar_before_the_error(tmp_path, capsys):
  root = tmp_path / "root"
  fx.write_image_folder(root, 2, images_per_class=3, seed=0)
  (root / "test" / "test_z" / "broken.png").write_bytes(b"not a png")
  status, out, err = run_in_process(data_cli.main, [
      "build", "image_folder", "--data_dir", str(tmp_path / "d"), "--manual_dir", str(root),
      "--image_size", "8"], capsys)
  assert_one_error_line(status, err, "broken.png")
  assert "\r" not in err and "\x1b" not in err, repr(err[:300])  # no TFDS progress bars
  assert "Downloading and preparing" not in out and "custom data configuration" not in err


# ----------------------------------------------------------------------------- predict, import

def test_predict_and_import_errors_are_the_last_line(tmp_path, capsys):
  status, _, err = run_in_process(predict_cli.main, [
      "--workdir", str(tmp_path / "none"), "--support", str(tmp_path), "--query",
      str(tmp_path)], capsys)
  assert_one_error_line(status, err, "not the workdir of a run")
  status, _, err = run_in_process(predict_cli.main, ["--workdir", str(tmp_path)], capsys)
  assert_one_error_line(status, err, "--support and --query are required")
  assert err.count("\n") == 1
  status, _, err = run_in_process(import_torch_cli.main, [
      "--workdir", str(tmp_path / "w"), "--backbone", str(tmp_path / "missing.npz"),
      "--backbone_arch", "metadiff"], capsys)
  assert_one_error_line(status, err, "missing.npz")
  status, _, err = run_in_process(import_torch_cli.main, [
      "--workdir", str(tmp_path / "w"), "--shots", "one"], capsys)
  assert_one_error_line(status, err, "invalid int value")
  assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- the printer

def test_the_error_closes_open_progress_bars_first(capsys, monkeypatch):
  monkeypatch.setattr(metrics, "_is_terminal", lambda stream: True)  # a bar, as on a terminal
  ours = metrics.Progress(100, "train")
  ours.update(7)
  theirs = tqdm.tqdm(total=10, desc="Generating", leave=False, position=1)  # as TFDS's
  theirs.update(3)
  capsys.readouterr()
  assert errors.report("the loss became NaN") == 2
  err = capsys.readouterr().err
  assert_one_error_line(2, err, "error: the loss became NaN")
  assert "train:" in err.split("error:")[0]  # the bar's last state stays, on its own line
  assert not ours.enabled and theirs.disable


def test_after_an_error_nothing_more_is_logged(capsys):
  try:
    with pytest.raises(SystemExit) as exit_info:
      errors.exit_command(errors.report("stop"))
    logging.getLogger("metadiff_jax").error("late")
    assert exit_info.value.code == 2
    assert logging.getLogger().manager.disable >= logging.CRITICAL
  finally:
    logging.disable(logging.NOTSET)
  assert capsys.readouterr().err.rstrip().split("\n")[-1] == "error: stop"


@pytest.mark.parametrize("config, override, message", [
    ("glyphs_conv4.py", "--config.train.learning_rate=nan",
     "config.train.learning_rate is nan; give a finite"),
    ("glyphs_conv4.py", "--config.pretrain.weight_decay=inf",
     "config.pretrain.weight_decay is inf"),
    ("glyphs_conv4.py", "--config.train.learning_rate=0",
     "config.train.learning_rate must be positive"),
    ("glyphs_conv4.py", "--config.stages=()", "config.stages is empty, so nothing would run"),
    ("glyphs_conv4.py", "--config.stages=('pretrian',)", "unknown stage 'pretrian'"),
    ("paper_analysis.py:dataset=glyphs", "--config.analysis.parts=('table9',)",
     "config.analysis.parts must name some of "),
    ("stability.py:dataset=glyphs", "--config.stability.variants=('faithful','stable')",
     "config.stability.variants"),
    ("stability.py:dataset=glyphs", "--config.diffusion.sampler=euler",
     "config.diffusion.sampler"),
    ("stability.py:dataset=glyphs", "--config.denoiser.inputs=('weights',)",
     "config.denoiser: inputs must start"),
    ("stability.py:dataset=glyphs", "--config.diffusion.feature_rms=-1.0",
     "config.diffusion.feature_rms"),
])
def test_values_no_run_can_use_are_refused_before_any_stage(config, override, message):
  # Found as the command finds them (its flag parsing, then `checks.check`), in one line.
  line = command_error(f"--config=configs/{config}", override)
  assert line.startswith(message) and "\n" not in line, line


def test_a_non_finite_number_inside_a_tuple_is_refused():
  config = parse_command("--config=configs/glyphs_conv4.py")
  config.unlock()
  config.analysis.gda_learning_rates = (0.1, float("nan"))
  with pytest.raises(errors.ConfigError, match=r"gda_learning_rates\[1\] is nan"):
    config_lib.check(config)
