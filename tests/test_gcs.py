"""Training on Google Cloud Storage, for real, against a local GCS emulator.

The emulator (``gcp-storage-emulator``, in memory) serves the JSON API that gcsfs (behind
``etils.epath``) and tensorstore (behind orbax) talk to; the CLI runs in subprocesses pointed at
it by environment variables, as a job on a cloud VM would be pointed at GCS by its credentials.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from train_helpers import tiny_config

ROOT = pathlib.Path(__file__).parent.parent
BUCKET = "bkt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send_generation_headers(server_module) -> None:
    """Makes the emulator's downloads carry ``x-goog-generation``, as real GCS's do.

    tensorstore reads an object's generation from that header (OCDBT's manifest is updated
    under generation preconditions); without it a re-read manifest fails with "Malformed
    StorageGeneration". The emulator's other behaviour is left as it is.
    """
    from gcp_storage_emulator.handlers import objects

    original = objects.download
    if getattr(original, "_sends_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - not found: the original handler answers 404
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return original(request, response, storage, *args, **kwargs)

    download._sends_generation = True
    objects.download = download  # objects.get (``?alt=media``) looks it up at call time
    for _, handlers in server_module.HANDLERS:  # the /download routes hold it directly
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = download


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator with an empty bucket; yields the environment that points clients at it."""
    # Both are in the dev extra: a missing one fails here, it is not skipped.
    import gcsfs  # noqa: F401 - epath's gs:// backend
    from gcp_storage_emulator import server as server_module

    _send_generation_headers(server_module)
    port = _free_port()
    server = server_module.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket=BUCKET)  # fmt: skip
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath) and google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's array writes)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "abc",  # tensorstore: no credential lookup
        "NO_GCE_CHECK": "True",  # google-auth: no probe of a GCE metadata server
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"url": url, "env": env}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _objects(gcs, prefix: str) -> list[str]:
    """Object names under ``prefix``, straight from the emulator's JSON API (no client cache)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{gcs['url']}/storage/v1/b/{BUCKET}/o?{query}") as reply:
        return [item["name"] for item in json.load(reply).get("items", [])]


def _upload(local: pathlib.Path, url: str) -> None:
    """Copies a local folder's files to ``url`` with epath (as a user would with gsutil)."""
    from etils import epath

    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        (epath.Path(url) / str(file.relative_to(local))).write_bytes(file.read_bytes())


def _cli(gcs, cfg, workdir, cwd, cache):
    env = dict(os.environ, **gcs["env"], PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               GAAM_JAX_CACHE=str(cache))  # fmt: skip
    cmd = [sys.executable, "-m", "train", "--config", str(cfg), "--workdir", str(workdir),
           "--no-progress"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip


def _table(out: str) -> str:
    """The printed results table (the lines from the first ``|``-row to the wall time)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next(i for i, line in enumerate(lines) if line.startswith("wall time"))
    return "\n".join(lines[start:end])


@pytest.mark.slow
def test_training_on_gcs_resumes_after_sigkill_to_the_local_result(gcs, toy, tmp_path):
    """Features and workdir on gs://: killed with SIGKILL after its first committed checkpoint,
    the same command resumes from the bucket and ends with the table, records and best-state
    bytes of an uninterrupted run on local disk; nothing lands in a local folder ``gs:``."""
    from etils import epath

    features = f"gs://{BUCKET}/features/toy/1.0.0"
    _upload(toy, features)
    workdir = f"gs://{BUCKET}/runs/toy"
    # A checkpoint at each epoch end: the emulator takes seconds a save (pure-Python HTTP), so
    # the killed job is still in its second epoch when the first checkpoint's record appears.
    overrides = dict(num_epochs=3, checkpoint_every_epochs=1, checkpoint_every_steps=0)
    local_cfg = tiny_config(tmp_path / "local.py", toy, **overrides)
    gcs_cfg = tiny_config(tmp_path / "gcs.py", features, **overrides)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cache = tmp_path / "cache"

    ref = _cli(gcs, local_cfg, tmp_path / "ref", cwd, cache)
    victim = _cli(gcs, gcs_cfg, workdir, cwd, cache)
    sums = "runs/toy/programs/toy/checkpoints/checksums/"
    deadline = time.time() + 120
    while time.time() < deadline and not _objects(gcs, sums) and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    out = victim.communicate()[0].decode()
    assert victim.returncode == -signal.SIGKILL, out[-3000:]
    assert _objects(gcs, sums), "no checksum record was committed before the deadline"
    assert not _objects(gcs, "runs/toy/results.json"), "the run finished before the kill"
    assert _objects(gcs, "runs/toy/.lock"), "the killed job's lock object is left behind"

    ref_out = ref.communicate(timeout=240)[0].decode()
    assert ref.returncode == 0, ref_out[-3000:]
    again = _cli(gcs, gcs_cfg, workdir, cwd, cache)
    out = again.communicate(timeout=240)[0].decode()
    assert again.returncode == 0, out[-3000:]

    assert _table(out) == _table(ref_out)
    remote = epath.Path(workdir)
    local = tmp_path / "ref"
    assert json.loads((remote / "results.json").read_text()) == json.loads(
        (local / "results.json").read_text()
    )
    for run in ("seed0_fold1", "seed0_fold2"):
        for name in ("best_state.msgpack", "record.json", "metrics.jsonl", "gate_mean.npy"):
            assert (remote / "toy" / run / name).read_bytes() == (
                local / "toy" / run / name
            ).read_bytes(), f"{run}/{name} differs"
        assert (remote / "toy" / run / "importance.png").exists()
        assert any((remote / "toy" / run / "tensorboard").iterdir()), "no TensorBoard events"
    assert not _objects(gcs, "runs/toy/.lock"), "a finished job releases its lock object"
    assert not any(p.name.startswith("gs:") for p in cwd.rglob("*")), list(cwd.rglob("*"))
    assert not (ROOT / "gs:").exists()
