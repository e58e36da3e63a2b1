"""notebooks/metadiff_colab.ipynb, executed headless top to bottom as CI runs it.

The parameters cell gets this checkout as the install source (the notebook pip-installs it
editable, never reaching GitHub), a temporary workdir and data directory, and TINY = True, which
shrinks the dataset and every stage to seconds. The kernel is this interpreter, on the CPU.
"""

import sys
import time

import nbformat
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
  assert "predict.predict(WORKDIR" in tagged(nb, "predict").source


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
