"""The package as a user meets it: the README's example and commands, the configs, imports."""

import ast
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_pipeline
from tiny_pipeline import load_config
from conftest import REPO
from metadiff_jax import schedule, tcunet


def readme_blocks(language, page="README.md"):
  text = (REPO / page).read_text()
  return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # the quickstart script in a process of its own
def test_api_doc_example_is_the_quickstart_script_and_runs():
  script = (REPO / "examples" / "quickstart.py").read_text()
  assert script in readme_blocks("python", "docs/API.md"), (
      "docs/API.md's example differs from examples/quickstart.py")
  result = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py")],
                          capture_output=True, text=True, timeout=600, check=True)
  accuracy = float(re.search(r"over 8 episodes: ([0-9.]+)", result.stdout).group(1))
  assert 0.2 < accuracy <= 1.0  # 5-way: well above chance even for an untrained denoiser


def test_readme_test_command_is_what_ci_runs():
  ci = (REPO / ".ci" / "run").read_text()
  commands = [line.strip() for block in readme_blocks("bash") for line in block.splitlines()]
  test_command = next(c for c in commands if "pytest" in c)
  assert test_command.split("&&")[-1].strip() in ci


def test_readme_demo_command_runs_the_config_that_the_tiny_preset_shrinks():
  first = readme_blocks("bash")[0]
  assert "python -m metadiff_jax.data build glyphs" in first
  main = first.split("python -m metadiff_jax.main", 1)[1].split("&&")[0].split()
  config_arg = main[main.index("--config") + 1]
  # The config the demo command runs is the glyph config's defaults, and the tests' tiny
  # config (tiny_pipeline.tiny_config) is that config with the tiny preset applied.
  demo = tiny_pipeline.parse_command(f"--config={config_arg}")
  assert demo.to_dict() == load_config("glyphs_conv4").to_dict()
  tiny = tiny_pipeline.parse_command(f"--config={config_arg}:tiny=1")
  assert tiny.to_dict() == tiny_pipeline.tiny_config(demo.data.data_dir).to_dict()


def test_the_demo_config_builds_the_core_and_is_locked():
  config = load_config("glyphs_conv4")
  sched = schedule.from_config(config)
  assert sched.num_steps == 1000
  np.testing.assert_allclose(np.asarray(sched.betas)[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  denoiser = dict(config.denoiser, feature_dim=512)
  model = tcunet.TCUNet(**denoiser)
  variables = model.init(jax.random.key(0), jnp.zeros((5, 512)), 0, jnp.ones((5, 512)),
                         jnp.arange(5))
  # The recommended variant's first block reads [g, w_t]: 2 x 512 inputs.
  assert variables["params"]["proto_inf1"]["kernel"].shape == (1024, 256)
  with pytest.raises(AttributeError):
    config.diffusion.num_step = 10  # misspelt: the locked config refuses it
  config.denoiser.hidden_dims = (64, 32)
  assert tcunet.TCUNet(**dict(config.denoiser, feature_dim=512)).widths == (64, 32, 32, 64, 512)


def test_importing_the_package_never_imports_tensorflow():
  code = ("import sys, metadiff_jax, metadiff_jax.diffusion, metadiff_jax.pytorch_weights; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_the_benchmark_path_imports_without_the_data_stack():
  # GPU machines have JAX, Flax and Optax but not tensorflow-datasets: the benchmarks must run.
  code = ("import sys, metadiff_jax.diffusion, metadiff_jax.data.augment, "
          "metadiff_jax.data.episodes, metadiff_jax.data.features, metadiff_jax.backbones, "
          "metadiff_jax.checkpoint, metadiff_jax.metrics, metadiff_jax.stages; "
          "bad = [m for m in ('tensorflow_datasets', 'tensorflow') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ----------------------------------------------------------------------------- the layers

def _module_name(path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict:
  """{module name: parsed source} of every module of the package."""
  return {_module_name(p): ast.parse(p.read_text()) for p in (REPO / "metadiff_jax").rglob("*.py")}


def _imports(name: str, tree, modules) -> dict:
  """{imported module of the package: {local name it is bound to, or None}}, from imports at
  any depth (module level and inside functions); `from package import x` names module x
  where x is one."""
  out = {}
  package = name if name in modules and any(m.startswith(name + ".") for m in modules) \
      else name.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name in modules:
          out.setdefault(alias.name, set()).add(alias.asname)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in modules:
          out.setdefault(full, set()).add(alias.asname or alias.name)
        elif base in modules:
          out.setdefault(base, set()).add(None)
  return out


def _graph():
  modules = _package_modules()
  return modules, {name: _imports(name, tree, modules) for name, tree in modules.items()}


def test_the_package_import_graph_has_no_cycle():
  _, graph = _graph()
  edges = {name: {m for m in imported if m != name} for name, imported in graph.items()}
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges[node]):
      if state.get(nxt) == "open":
        cycle = stack[stack.index(nxt):] + [nxt]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for name in sorted(edges):
    if name not in state:
      visit(name)


def test_the_library_imports_no_stage_and_a_stage_no_other_stage():
  _, graph = _graph()
  stage = lambda m: m.startswith("metadiff_jax.stages.")
  for name, imported in graph.items():
    stages = sorted(m for m in imported if stage(m) or m == "metadiff_jax.stages")
    if name in ("metadiff_jax.main", "metadiff_jax.stages"):
      continue  # the command and the package that runs the stages
    if not stage(name):
      assert not stages, f"{name} (library) imports {stages}"
    else:
      allowed = {"metadiff_jax.stages.baselines"} if name.endswith(".analysis") else set()
      assert set(stages) <= allowed, f"{name} imports the stages {stages}"


def test_no_module_reaches_into_another_modules_private_names():
  modules, graph = _graph()
  reached = []
  for name, tree in modules.items():
    aliases = {alias for imported, names in graph[name].items() if imported != name
               for alias in names if alias}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        reached.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("metadiff_jax"):
        reached += [f"{name}:{node.lineno} from {node.module} import {a.name}"
                    for a in node.names if a.name.startswith("_")]
  assert not reached, reached

