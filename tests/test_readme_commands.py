"""The README's documented command sequence, run as written on the tiny glyph set.

The README's commands are read from README.md itself, so that the test follows them when they
change: the demo (`configs/glyphs_conv4.py`), then the paper's analysis pointed at the demo's
workdir, then `predict --export_example`, the command it prints, and the README's own predict
command. Each runs in one temporary directory (relative paths as written, `configs/` linked
in), the pipeline's with the tiny overrides of tests/tiny_pipeline.py appended, and must exit
0. The pipeline commands run as processes; the predict commands run their `main` in this
process, which is what `python -m metadiff_jax.predict` runs, to save an interpreter's start
each.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from tiny_pipeline import TINY_OVERRIDES, cpu_env
from metadiff_jax import predict as predict_lib

README = REPO / "README.md"

# The analysis on tiny settings: Figure 5 alone (the part that needs the demo's denoisers and
# none of the meta-trained baselines), over 16 test episodes.
TINY_ANALYSIS = ["--config.analysis.parts=('fig5',)", "--config.analysis.episodes=16",
                 "--config.analysis.batch_episodes=8", "--config.analysis.trajectory_every=2"]


def readme_commands():
  """Every `python -m metadiff_jax.*` command of the README's bash blocks, in order, as
  argument lists (continued lines joined, `&&` chains split)."""
  text = README.read_text()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    for line in block.replace("\\\n", " ").splitlines():
      for part in line.split("&&"):
        words = shlex.split(part.split("#")[0])
        if words[:3] in (["python", "-m", "metadiff_jax.main"],
                         ["python", "-m", "metadiff_jax.predict"]):
          commands.append(words)
  return commands


def documented_sequence():
  """(demo, analysis, export, predict): the README's commands of the sequence a new user runs.

  The export command is the README's predict workdir with its inline
  `--export_example DIR` (the README gives it in the text, not as a block).
  """
  commands = readme_commands()
  demo = next(c for c in commands if c[3:5] == ["--config", "configs/glyphs_conv4.py"])
  analysis = next(c for c in commands
                  if c[3:5] == ["--config", "configs/paper_analysis.py:dataset=glyphs"])
  predict = next(c for c in commands if c[2] == "metadiff_jax.predict" and "--support" in c)
  (export_flag,) = set(re.findall(r"`(--export_example \S+)`", README.read_text()))
  workdir = predict[predict.index("--workdir") + 1]
  export = ["python", "-m", "metadiff_jax.predict", "--workdir", workdir,
            *shlex.split(export_flag)]
  return demo, analysis, export, predict


def run(words, cwd, *extra):
  """Runs a documented command (its `python` this interpreter) on the CPU; the process."""
  assert words[0] == "python", words
  return subprocess.run([sys.executable, *words[1:], *extra], cwd=cwd, env=cpu_env(),
                        capture_output=True, text=True, timeout=900)


def run_predict(words, capsys):
  """A documented `python -m metadiff_jax.predict` command, in this process (its `main`, as
  `-m` runs it, without another interpreter's start); (exit status, stdout)."""
  assert words[:3] == ["python", "-m", "metadiff_jax.predict"], words
  capsys.readouterr()
  status = predict_lib.main(words[3:])
  return status, capsys.readouterr().out


@pytest.mark.slow  # the demo and the analysis commands from scratch, then predict
def test_the_readme_commands_run_in_order(data_dir, tmp_path, monkeypatch, capsys):
  demo, analysis, export, predict = documented_sequence()
  workdir = demo[demo.index("--workdir") + 1]
  # The analysis is documented on the demo's workdir, as is predict.
  assert analysis[analysis.index("--workdir") + 1] == workdir
  assert predict[predict.index("--workdir") + 1] == workdir
  os.symlink(REPO / "configs", tmp_path / "configs")
  export_dir = export[export.index("--export_example") + 1]
  if os.path.isabs(export_dir):  # e.g. /tmp/episode: kept inside this test's directory
    export = [*export[:export.index("--export_example") + 1], str(tmp_path / "episode")]
    export_dir = str(tmp_path / "episode")
  tiny = [f"--config.data.data_dir={data_dir}", *TINY_OVERRIDES]

  proc = run(demo, tmp_path, *tiny)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(tmp_path / workdir / "results.md")

  proc = run(analysis, tmp_path, *tiny, *TINY_ANALYSIS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.getsize(tmp_path / workdir / "analysis" / "fig5_convergence.json") > 0

  monkeypatch.chdir(tmp_path)
  status, printed = run_predict(export, capsys)
  assert status == 0, printed
  # It prints the command that classifies the episode; that command runs as printed.
  status, printed = run_predict(shlex.split(printed.split("now run:", 1)[1]), capsys)
  assert status == 0 and "accuracy" in printed, printed

  # The README's own predict command, on the exported episode as its folders.
  for flag, folder in (("--support", "support"), ("--query", "query")):
    os.symlink(os.path.join(export_dir, folder),
               tmp_path / predict[predict.index(flag) + 1].rstrip("/"))
  status, printed = run_predict(predict, capsys)
  assert status == 0, printed
  out = predict[predict.index("--out") + 1]
  assert os.path.getsize(tmp_path / out) > 0

  # The paper's method as published trains other denoisers than the demo's: on the demo's
  # workdir that stops with one line (the workdir untouched), never a traceback.
  faithful = list(analysis)
  faithful[faithful.index("--config") + 1] += ",variant=faithful"
  record = (tmp_path / workdir / "config.json").read_text()
  proc = run(faithful, tmp_path, *tiny, *TINY_ANALYSIS)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "denoiser.inputs" in last, last  # it names what differs
  assert (tmp_path / workdir / "config.json").read_text() == record
