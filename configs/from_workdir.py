"""The config a workdir was last run with: `--config=configs/from_workdir.py:DIR`.

Every run writes its config to DIR/config.json (so does `python -m metadiff_jax.import_torch`,
for the imported parameters). This file reads it back, so that more stages can run on a
finished or imported workdir without repeating its settings:

    python -m metadiff_jax.main --config=configs/from_workdir.py:runs/glyphs_conv4 \\
        --workdir=runs/glyphs_conv4 --config.stages="('eval',)" --config.eval.episodes=2000

Field overrides (`--config.x.y=...`) apply on top, as with any config file.
"""

from metadiff_jax import config_lib
from metadiff_jax.errors import ConfigError


def get_config(arg=None):
  if not arg:
    raise ConfigError("configs/from_workdir.py needs the workdir after a colon: "
                      "--config=configs/from_workdir.py:DIR")
  return config_lib.load_workdir_config(arg)
