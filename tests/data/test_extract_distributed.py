"""Two JAX processes on localhost (gloo) extract the shards and the dataset of one process."""

import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from data import extract, pipeline
from data.datasets import encoder_features

HERE = pathlib.Path(__file__).parents[1]  # tests/: the worker script is there
NAME = "pang_lee_polarity_minilm_mean"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(folder: pathlib.Path) -> dict[str, np.ndarray]:
    source, _ = pipeline.load_features(folder / "encoder_features" / NAME / "1.0.0")
    rows = [source[i] for i in range(len(source))]
    return {k: np.stack([r[k] for r in rows]) for k in ("features", "label", "id", "group")}


@pytest.mark.slow
def test_two_processes_extract_what_one_does(tmp_path):
    # A batch per shard (the default batch of 32 would pad each shard of 8 to 32 rows).
    args = ["--dataset", "pang_lee_polarity", "--limit", "40", "--shard-size", "8",
            "--batch-size", "8", "--no-progress"]  # fmt: skip
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "extract_distributed_worker.py"),
                str(i),
                str(port),
                str(tmp_path / "multi"),
                str(tmp_path / "unshared"),
                *args,
            ],
            cwd=HERE.parent,
            env=dict(os.environ, PYTHONPATH=str(HERE.parent)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for i in range(2)
    ]
    try:  # meanwhile, the one-process run (its compilations land in the shared XLA cache)
        assert extract.main([*args, "--data-dir", str(tmp_path / "one")]) == 0
        outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    # Process i computed exactly the shards index % 2 == i; both report the same dataset.
    written = [re.findall(r"^shards \[(.*)\]$", out, re.M) for out in outputs]
    assert written == [["0, 2, 4"], ["1, 3"]], outputs
    paths = [re.findall(r"^wrote (\S+):", out, re.M) for out in outputs]
    assert paths == [[str(tmp_path / "multi" / "encoder_features" / NAME / "1.0.0")]] * 2
    # The second run: process 1's error ends both processes with exit 2, each in one line.
    assert [re.findall(r"^codes (.*)$", out, re.M) for out in outputs] == [["0 2"]] * 2
    errors = [re.findall(r"^error: .*$", out, re.M) for out in outputs]
    unshared = "is not visible to process 1: --data-dir must be a folder every process shares."
    assert len(errors[1]) == 1 and errors[1][0].endswith(unshared), errors
    assert errors[0] == [f"error: process 1 of 2 failed: {errors[1][0][len('error: ') :]}"]

    shards = {run: tmp_path / run / "shards" / NAME for run in ("one", "multi")}
    for index in range(5):
        name = encoder_features.shard_name(index)
        with np.load(shards["one"] / name) as one, np.load(shards["multi"] / name) as multi:
            assert sorted(one) == sorted(multi) == ["features", "group", "id", "label"]
            for key in one:  # same batches, same program: bit for bit
                np.testing.assert_array_equal(multi[key], one[key], err_msg=f"{name}/{key}")
    assert (shards["one"] / encoder_features.MANIFEST).read_text() == (
        shards["multi"] / encoder_features.MANIFEST
    ).read_text()
    one, multi = _read(tmp_path / "one"), _read(tmp_path / "multi")
    assert len(one["id"]) == 40
    for key in one:
        np.testing.assert_array_equal(multi[key], one[key], err_msg=key)
