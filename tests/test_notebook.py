"""notebooks/metadiff_colab.ipynb, executed headless top to bottom as CI runs it.

The parameters cell gets this checkout as the install source (the notebook pip-installs it
editable, never reaching GitHub), a temporary workdir and data directory, and TINY = True, which
shrinks the dataset and every stage to seconds. The kernel is this interpreter, on the CPU.
"""

import os
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from conftest import REPO
from metadiff_jax.stages import evaluate

NOTEBOOK = REPO / "notebooks" / "metadiff_colab.ipynb"


def read_notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def tagged(nb, tag):
  """The one cell that carries `tag`."""
  cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"{len(cells)} cells tagged {tag!r}"
  return cells[0]


def kernel_manager():
  """A manager of the "python3" kernel that runs this interpreter: ipykernel's own kernel
  spec, which jupyter_client resolves to sys.executable, whatever specs of other Pythons the
  user's Jupyter directories hold."""
  specs = KernelSpecManager(kernel_dirs=[])
  argv = specs.get_kernel_spec("python3").argv
  assert argv[0] == sys.executable, argv
  return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def test_notebook_is_stored_clean():
  nb = read_notebook()
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, "store it without outputs"
  source = tagged(nb, "parameters").source
  for name in ("INSTALL_SOURCE", "WORKDIR", "DATA_DIR", "TINY"):
    assert f"\n{name} = " in f"\n{source}", name
  # No address that no one has confirmed: the user names the source.
  assert '\nINSTALL_SOURCE = ""' in f"\n{source}"
  assert "github.com" not in "".join(c.source for c in nb.cells)
  assert "predict.predict(WORKDIR" in tagged(nb, "predict").source


# ----------------------------------------------------------------------------- the install cell

def test_an_empty_install_source_stops_with_one_line(tmp_path, monkeypatch):
  """In a kernel, as Colab runs it: the install cell's output is one `error:` line naming
  INSTALL_SOURCE and the ways to set it, and nothing is installed."""
  nb = read_notebook()
  nb.cells = [tagged(nb, "parameters"), tagged(nb, "install")]
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = NotebookClient(nb, km=kernel_manager(), timeout=120, kernel_name="python3",
                          allow_errors=True, resources={"metadata": {"path": str(tmp_path)}})
  client.execute(cleanup_kc=True)
  outputs = nb.cells[1].outputs
  errors = [o for o in outputs if o.output_type == "error"]
  assert len(errors) == 1 and not [o for o in outputs if o.output_type == "stream"], outputs
  assert len(errors[0].traceback) == 1, errors[0].traceback
  line = errors[0].traceback[0]
  assert line.startswith("error: INSTALL_SOURCE is empty; set INSTALL_SOURCE"), line
  assert "git archive" in line and "folder" in line and "URL" in line


class _Commands:
  """Stands in for subprocess.Popen in the install cell: records commands, runs none; those
  whose program is in `failing` exit with status 128."""

  def __init__(self, failing=()):
    self.run, self.failing, self.returncode = [], failing, 0

  def __call__(self, command, **kwargs):
    del kwargs
    self.run.append(list(command))
    self.returncode = 128 if command[0] in self.failing else 0
    return self

  stdout = ()

  def wait(self):
    return self.returncode


def run_install_cell(monkeypatch, failing=(), **parameters):
  """The install cell's code with `parameters`, in this process, commands recorded (those of
  the programs in `failing` fail); returns (its namespace, the commands)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  commands = _Commands(failing)
  monkeypatch.setattr(subprocess, "Popen", commands)
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(REPO)  # the cell changes directory; this restores it
  namespace = {"WORKDIR": "run", "DATA_DIR": "tfds", "JAX_EXTRA": None, **parameters}
  exec(compile(tagged(read_notebook(), "install").source, "install", "exec"), namespace)  # pylint: disable=exec-used
  return namespace, commands.run


def fake_repository(root):
  """The files the install cell looks for (setup.cfg, metadiff_jax/, configs/)."""
  (root / "metadiff_jax").mkdir(parents=True)
  (root / "configs").mkdir()
  (root / "setup.cfg").write_text("[metadata]\nname = metadiff_jax\n")
  (root / "configs" / "glyphs_conv4.py").write_text("")
  return root


def test_the_install_cell_takes_an_archive_or_a_folder(tmp_path, monkeypatch):
  import shutil  # pylint: disable=g-import-not-at-top
  repo = fake_repository(tmp_path / "clone" / "metadiff_jax")
  # An archive as `git archive --prefix=metadiff_jax/` or a zipped folder makes it.
  archive = shutil.make_archive(str(tmp_path / "metadiff_jax"), "zip", tmp_path / "clone")
  unpacked = tmp_path / "source"
  namespace, commands = run_install_cell(monkeypatch, INSTALL_SOURCE=archive,
                                         SOURCE_DIR=str(unpacked))
  assert namespace["CHECKOUT"] == str(unpacked / "metadiff_jax")
  assert (unpacked / "metadiff_jax" / "configs" / "glyphs_conv4.py").exists()
  assert commands == [[sys.executable, "-m", "pip", "install", "-q", "-e",
                       str(unpacked / "metadiff_jax")]]
  assert os.getcwd() == str(unpacked / "metadiff_jax")
  # Run again: the unpacked copy is reused; a .tar.gz without a top folder works too.
  (unpacked / "metadiff_jax" / "kept").write_text("")
  run_install_cell(monkeypatch, INSTALL_SOURCE=archive, SOURCE_DIR=str(unpacked))
  assert (unpacked / "metadiff_jax" / "kept").exists()
  tarball = shutil.make_archive(str(tmp_path / "flat"), "gztar", repo)
  namespace, _ = run_install_cell(monkeypatch, INSTALL_SOURCE=tarball,
                                  SOURCE_DIR=str(tmp_path / "flat_source"))
  assert namespace["CHECKOUT"] == str(tmp_path / "flat_source")
  # A folder (a clone, or one on Google Drive) is installed where it is.
  namespace, commands = run_install_cell(monkeypatch, INSTALL_SOURCE=str(repo),
                                         SOURCE_DIR=str(tmp_path / "unused"))
  assert namespace["CHECKOUT"] == str(repo) and commands[-1][-1] == str(repo)
  assert not (tmp_path / "unused").exists()


def test_the_install_cell_refuses_what_it_cannot_use_in_one_line(tmp_path, monkeypatch):
  def refused(source, source_dir=tmp_path / "source", failing=()):
    with pytest.raises(Exception) as error:  # the cell's own class, InstallSourceError
      run_install_cell(monkeypatch, failing, INSTALL_SOURCE=source, SOURCE_DIR=str(source_dir))
    assert type(error.value).__name__ == "InstallSourceError", error.value
    (line,) = error.value._render_traceback_()  # pylint: disable=protected-access
    assert line.startswith("error: ") and "\n" not in line
    return line

  assert "INSTALL_SOURCE is empty" in refused("")
  assert "INSTALL_SOURCE is empty" in refused("   ")
  assert "does not exist" in refused(str(tmp_path / "absent.zip"))
  assert "drive.mount" in refused("/content/drive/MyDrive/metadiff_jax.zip")
  wheel = tmp_path / "metadiff_jax-0.1-py3-none-any.whl"
  wheel.write_bytes(b"PK")
  assert "wheel" in refused(str(wheel)) and "configs/" in refused(str(wheel))
  notes = tmp_path / "notes.txt"
  notes.write_text("not an archive")
  assert "neither a folder nor" in refused(str(notes))
  (tmp_path / "empty").mkdir()
  assert "does not hold the metadiff_jax repository" in refused(str(tmp_path / "empty"))
  # An unpacking target that holds other files is left alone.
  import shutil  # pylint: disable=g-import-not-at-top
  fake_repository(tmp_path / "clone" / "metadiff_jax")
  archive = shutil.make_archive(str(tmp_path / "a"), "zip", tmp_path / "clone")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "mine.txt").write_text("keep")
  assert "already holds other files" in refused(archive, tmp_path / "busy")
  assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"
  # A truncated archive stops in one line; once whole again, it is unpacked afresh.
  truncated = tmp_path / "truncated.tar.gz"
  whole = shutil.make_archive(str(tmp_path / "whole"), "gztar", tmp_path / "clone")
  truncated.write_bytes(open(whole, "rb").read()[:300])
  assert "cannot unpack" in refused(str(truncated), tmp_path / "partial")
  shutil.copy(whole, truncated)
  namespace, _ = run_install_cell(monkeypatch, INSTALL_SOURCE=str(truncated),
                                  SOURCE_DIR=str(tmp_path / "partial"))
  assert namespace["CHECKOUT"] == str(tmp_path / "partial" / "metadiff_jax")
  # A URL: git's failure (a wrong address, no network), a clone without the repository, and
  # a clone target that holds other files.
  url = "https://example.org/someone/metadiff_jax.git"
  assert "git could not clone" in refused(url, tmp_path / "clone_a", failing=("git",))
  assert "does not hold the metadiff_jax repository" in refused(url, tmp_path / "clone_b")
  assert "already holds other files" in refused(url, tmp_path / "busy")


@pytest.mark.slow  # the whole tiny pipeline in a Jupyter kernel
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nb = read_notebook()
  parameters = tagged(nb, "parameters")
  parameters.source += (
      "\n\n# Injected by tests/test_notebook.py\n"
      f"INSTALL_SOURCE = {str(REPO)!r}\n"
      f"WORKDIR = {str(tmp_path / 'run')!r}\n"
      f"DATA_DIR = {str(tmp_path / 'tfds')!r}\n"
      "TINY = True\n")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel and its subprocesses inherit it
  client = NotebookClient(nb, km=kernel_manager(), timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  start = time.monotonic()
  # Raises CellExecutionError, with the cell's traceback, if a cell fails.
  client.execute(cleanup_kc=True)
  print(f"notebook executed in {time.monotonic() - start:.0f} s")

  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.execution_count is not None, cell.source[:80]
      assert all(o.output_type != "error" for o in cell.outputs), cell.source[:80]
  install = "".join(o.get("text", "") for o in tagged(nb, "install").outputs)
  assert "git clone" not in install and f"-e {REPO}" in install, install[-2000:]
  table = "\n".join(o.get("data", {}).get("text/markdown", "")
                    for o in tagged(nb, "results").outputs)
  assert evaluate.METHODS[0][1] in table and "5-way 1-shot" in table, table[:2000]
  for tag in ("episode-grid", "convergence-curve", "predict"):
    images = [o for o in tagged(nb, tag).outputs if "image/png" in o.get("data", {})]
    assert images, f"no PNG from the {tag} cell"
  # The exported test episode was classified (4 queries per class) and the CSV written.
  predictions = "\n".join(o.get("data", {}).get("text/markdown", "")
                          for o in tagged(nb, "predict").outputs)
  assert f"{4 * 5} queries, 5 classes, 1-shot denoiser; accuracy" in predictions, predictions
  assert (tmp_path / "run" / "predictions.csv").exists()
