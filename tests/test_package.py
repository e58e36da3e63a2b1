"""The package as a user meets it: the README's example and commands, the configs, imports."""

import importlib.util
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from metadiff_jax import schedule, tcunet


def readme_blocks(language):
  text = (REPO / "README.md").read_text()
  return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_example_is_the_quickstart_script_and_runs():
  script = (REPO / "examples" / "quickstart.py").read_text()
  assert script in readme_blocks("python"), "README's example differs from examples/quickstart.py"
  result = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py")],
                          capture_output=True, text=True, timeout=600, check=True)
  accuracy = float(re.search(r"over 8 episodes: ([0-9.]+)", result.stdout).group(1))
  assert 0.2 < accuracy <= 1.0  # 5-way: well above chance even for an untrained denoiser


def test_readme_test_command_is_what_ci_runs():
  ci = (REPO / ".ci" / "run").read_text()
  commands = [line.strip() for block in readme_blocks("bash") for line in block.splitlines()]
  test_command = next(c for c in commands if "pytest" in c)
  assert test_command.split("&&")[-1].strip() in ci


def test_readme_demo_command_runs_the_pipeline_config_that_the_tests_run():
  first = readme_blocks("bash")[0]
  assert "python -m metadiff_jax.data build glyphs" in first
  assert "python -m metadiff_jax.main --config configs/glyphs_conv4.py --workdir" in first
  assert (REPO / "configs" / "glyphs_conv4.py").exists()
  # tests/test_pipeline.py runs that config, shrunk, through the same command.
  assert "configs/glyphs_conv4.py" in (REPO / "tests" / "test_pipeline.py").read_text()


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
  code = ("import sys, metadiff_jax, metadiff_jax.diffusion, metadiff_jax.torch_import; "
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
