"""One process of the 2-process extraction test (tests/data/test_extract_distributed.py).

Usage: python extract_distributed_worker.py PROCESS_ID PORT DATA_DIR OTHER_DIR EXTRACT_ARGS...

Runs ``python -m data.extract EXTRACT_ARGS --data-dir DATA_DIR --distributed`` and prints
``shards [i, ...]``, the shards this process computed; then the same again, except that
process 1 is given ``OTHER_DIR`` (a folder the processes do not share), and prints
``codes A B``, the exit codes of the two runs.
"""

import os
import re
import sys

# One CPU device per process, under the test process's other XLA flags (the same code
# generation as its one-process run, so the features can be compared bit for bit).
flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: int, data_dir: str, other_dir: str, argv: list[str]) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    from data import extract

    assert jax.process_count() == 2 and jax.local_device_count() == 1
    written = []
    original = extract.extract

    def recording(*args, **kwargs):  # what main() runs, recording the shards it writes
        return original(*args, on_shard=written.append, **kwargs)

    extract.extract = recording
    first = extract.main([*argv, "--data-dir", data_dir, "--distributed"])
    print(f"shards {written}", flush=True)
    # A user error on process 1 only: process 0 must stop too, not wait at a barrier.
    second = extract.main([*argv, "--data-dir", other_dir if process_id else data_dir,
                           "--distributed"])  # fmt: skip
    print(f"codes {first} {second}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
