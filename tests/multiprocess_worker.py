"""One process of the 2-process data-parallel test (tests/train/test_multiprocess.py).

Usage: python multiprocess_worker.py PROCESS_ID PORT CONFIG DATASET OUT.npz
"""

import os
import re
import sys

# Two CPU devices per process, under the test process's other XLA flags (tests/conftest.py).
flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: int, config_path: str, dataset: str, out: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    import numpy as np
    from jax.experimental import multihost_utils

    from data import pipeline
    from gaam_jax import sharding
    from train import config as config_lib
    from train import feeds
    from train import steps as steps_lib
    from train.steps import Steps, stacked_zeros

    # Initial states compiled under the test flags, as in the test process (tests/conftest.py).
    steps_lib.INIT_COMPILER_OPTIONS = {}

    assert jax.device_count() == 4 and jax.local_device_count() == 2
    config = config_lib.load(config_path, ["model.num_heads=4"])
    source, info = pipeline.load_features(dataset)
    mesh = sharding.make_mesh({"data": -1, "model": 1})
    steps = Steps(config, 2, info.features["features"].shape, mesh=mesh)
    arrays = {}
    # Both feeds: grain (each process reads its rows) and device-resident (replicated data).
    for name, feed in (("grain", feeds.GrainFeed(steps, source, 2)),
                       ("device", feeds.DeviceFeed(steps, source, 2))):  # fmt: skip
        plan = feeds.Plan((np.arange(64),), (np.arange(8),), (0,))
        orders = feed.orders(plan, 0)
        state, _ = feed.train(steps.init_state([0]), stacked_zeros(1), orders, 0, 3)
        params = jax.tree.map(
            lambda x: x[0], multihost_utils.process_allgather(state.params, tiled=True)
        )
        arrays.update(
            {f"{name}/" + "/".join(k): np.asarray(v) for k, v in _flatten(params).items()}
        )
    if jax.process_index() == 0:
        np.savez(out, **arrays)
    jax.distributed.shutdown()


def _flatten(tree):
    from flax.traverse_util import flatten_dict

    return flatten_dict(tree)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
