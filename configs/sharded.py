"""The main job sharded over every device and host: batch over ``data``, heads over ``model``.

Same as ``configs/default.py`` plus a device mesh. On one host with 8 accelerators::

    python -m train --config configs/sharded.py --workdir out/sharded --config.mesh.model=2

On several hosts (TPU pod slice, SLURM), run the same command on every host with
``--distributed``. ``mesh.data = -1`` takes the devices left after ``mesh.model``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the config."""
    c = default.get_config()
    c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
    return c
