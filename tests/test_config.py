"""The config layer: defaults without model imports, the tiny preset, and the owners' checks."""

import subprocess
import sys

import pytest
from conftest import REPO
from metadiff_jax import checks, config_lib
from metadiff_jax.errors import ConfigError
from tiny_pipeline import TINY_OVERRIDES, load_config, parse_command

CPU_CONFIGS = ("glyphs_conv4", "textures_conv4", "image_folder_conv4")


def test_the_config_layer_imports_no_model_module_and_no_jax():
  # Every model module imports JAX, so none can hide behind another import.
  code = ("import sys, metadiff_jax.config_lib, metadiff_jax.config_flag; "
          "bad = sorted(m for m in sys.modules if m in ('jax', 'flax', 'metadiff_jax.diffusion', "
          "'metadiff_jax.heads', 'metadiff_jax.tcunet', 'metadiff_jax.schedule', "
          "'metadiff_jax.data.augment', 'metadiff_jax.mesh')); assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_the_tiny_preset_sets_the_tiny_fields_and_nothing_else(name):
  tiny, plain = load_config(name, "tiny=1"), load_config(name)
  assert tiny.is_locked
  expected = plain.to_dict()
  for field, value in config_lib.TINY.items():
    section, key = field.split(".")
    assert tiny[section][key] == value, field
    expected[section][key] = value
  assert tiny.to_dict() == expected
  assert tiny.data.builder_config == "tiny" and tiny.diffusion.num_steps == 10
  assert config_lib.eval_shots(tiny) == (1,) and tiny.train.steps == 20
  assert load_config(name, "tiny=0").to_dict() == plain.to_dict()


def test_presets_beside_tiny_still_choose_their_fields():
  for arg in ("shot=5,tiny=1", "tiny=1,shot=5"):
    config = load_config("glyphs_conv4", arg)
    assert tuple(config.train.shots) == (5,) and config_lib.eval_shots(config) == (5,)
    assert config.train.steps == 20
  config = load_config("glyphs_conv4", "tiny=1,variant=faithful")
  assert config_lib.variant_of(config) == "faithful" and config.train.steps == 20
  with pytest.raises(ConfigError, match="config preset tiny=yes must be tiny=1"):
    load_config("glyphs_conv4", "tiny=yes")


def test_the_tiny_overrides_give_the_tiny_preset():
  # The tests' command lines add TINY_OVERRIDES to a config file; they must parse to the preset.
  overridden = parse_command("--config=configs/glyphs_conv4.py", *TINY_OVERRIDES)
  preset = parse_command("--config=configs/glyphs_conv4.py:tiny=1")
  assert not isinstance(overridden, str), overridden
  assert overridden.to_dict() == preset.to_dict()


@pytest.mark.parametrize("section, field, value, match", [
    ("diffusion", "sampler", "euler", r"config.diffusion.sampler must be one of original, ddpm, "
                                      r"ddim, got 'euler'"),
    ("diffusion", "feature_rms", 0.0, r"config.diffusion.feature_rms must be > 0 or None"),
    ("diffusion", "num_sampling_steps", 1001, r"num_sampling_steps must be an integer in \[1, "
                                              r"num_steps = 1000\] or None, got 1001"),
    ("denoiser", "inputs", ("weights",), r"config.denoiser: inputs must start with 'gradient'"),
    ("denoiser", "prediction", "v", r"config.denoiser: unknown prediction 'v'"),
])
def test_each_owner_checks_its_values(section, field, value, match):
  config = config_lib.base_config()
  config[section][field] = value
  with pytest.raises(ConfigError, match=match) as info:
    checks.check(config)
  assert "\n" not in str(info.value)


def test_a_denoiser_without_a_unet_predicts_the_noise():
  config = config_lib.base_config()
  config.denoiser.update(dict(unet=False, prediction="x0"))
  config.stages = ("pretrain", "prototypes", "eval")
  with pytest.raises(ConfigError, match="set config.denoiser.prediction = 'eps'"):
    checks.check(config)


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_the_cpu_configs_pass_every_check(name):
  checks.check(load_config(name))
  checks.check(load_config(name, "tiny=1"))
