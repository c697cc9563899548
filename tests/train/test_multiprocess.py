"""Two JAX processes on localhost (gloo CPU collectives) train data-parallel like one process."""

import os
import pathlib
import socket
import subprocess
import sys

import chex
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from train_helpers import tiny_config, toy_features

from data import pipeline
from train import config as config_lib
from train.steps import Steps, stacked_zeros

HERE = pathlib.Path(__file__).parents[1]  # tests/: the worker script is there


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    dataset = toy_features(tmp_path / "toy", n=64, layers=8, dim=16)
    cfg = tiny_config(tmp_path / "cfg.py", dataset, batch_size=8)
    port = _free_port()
    out = tmp_path / "params.npz"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "multiprocess_worker.py"),
                str(i),
                str(port),
                str(cfg),
                str(dataset),
                str(out),
            ],
            cwd=HERE.parent,
            env=dict(os.environ, PYTHONPATH=str(HERE.parent)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    for p in procs:
        try:
            code = p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert code == 0, p.stdout.read().decode()[-3000:]

    # One process, no mesh, the same global batches.
    config = config_lib.load(cfg, ["model.num_heads=4"])
    source, _ = pipeline.load_features(dataset)
    steps = Steps(config, 2, (8, 16))
    state, sums = steps.init_state([0]), stacked_zeros(1)
    for rows in pipeline.epoch_order(np.arange(64), batch_size=8, seed=0, epoch=0)[:3]:
        x = np.stack([source[int(i)]["features"] for i in rows])[None]
        label = np.array([[source[int(i)]["label"] for i in rows]], np.int32)
        state, sums = steps.train_step(state, sums, {"x": x, "label": label}, np.array([True]))
    flat = {"/".join(k): np.asarray(v)[0] for k, v in flatten_dict(state.params).items()}
    expected = {f"{feed}/{k}": v for feed in ("grain", "device") for k, v in flat.items()}
    got = dict(np.load(out))
    assert set(got) == set(expected)
    # float32 gradients all-reduced across processes in another order: ~1e-6 relative.
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-5)
