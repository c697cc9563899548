"""A local Google Cloud Storage emulator for the gs:// tests (fixture ``gcs`` in conftest).

The emulator (``gcp-storage-emulator``, in memory) serves the JSON API that gcsfs (behind
``etils.epath``) and tensorstore (behind orbax) talk to. :func:`start` points this process's
clients at it by environment variables, as a job on a cloud VM is pointed at GCS by its
credentials; subprocesses get them from ``env``.
"""

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

BUCKET = "bkt"
# While an object of this name is in the bucket, downloads lack ``x-goog-generation``
# (:func:`answer_malformed`): a store that starts answering malformed midway through a run.
MALFORMED = "_emulator/malformed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send_generation_headers(server_module) -> None:
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
        if obj is not None and not _exists(storage, MALFORMED):
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return original(request, response, storage, *args, **kwargs)

    download._sends_generation = True
    objects.download = download  # objects.get (``?alt=media``) looks it up at call time
    for _, handlers in server_module.HANDLERS:  # the /download routes hold it directly
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = download


def _exists(storage, name: str) -> bool:
    try:
        return storage.get_file_obj(BUCKET, name) is not None
    except Exception:  # noqa: BLE001 - the emulator raises its own NotFound
        return False


def answer_malformed(gcs) -> None:
    """Makes the running emulator leave out ``x-goog-generation`` from now on: tensorstore's
    next read of an OCDBT manifest fails. One plain upload, straight to its JSON API."""
    query = urllib.parse.urlencode({"uploadType": "media", "name": MALFORMED})
    request = urllib.request.Request(
        f"{gcs['url']}/upload/storage/v1/b/{BUCKET}/o?{query}",
        data=b"1",
        method="POST",
        headers={"Content-Type": "application/octet-stream"},
    )
    urllib.request.urlopen(request).close()


def objects(gcs, prefix: str) -> list[str]:
    """Object names under ``prefix``, straight from the emulator's JSON API (no client cache)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{gcs['url']}/storage/v1/b/{BUCKET}/o?{query}") as reply:
        return [item["name"] for item in json.load(reply).get("items", [])]


def upload(local: pathlib.Path, url: str) -> None:
    """Copies a local folder's files to ``url`` with epath (as a user would with gsutil)."""
    from etils import epath

    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        (epath.Path(url) / str(file.relative_to(local))).write_bytes(file.read_bytes())


@contextlib.contextmanager
def start(*, generation_header: bool = True):
    """A GCS emulator with an empty bucket; yields the environment that points clients at it.

    The emulator runs in a process of its own: in the test's process its HTTP threads would
    share the interpreter lock with the training they serve (a fine-tuning run took twice as
    long).

    Args:
      generation_header: send ``x-goog-generation`` with downloads, as real GCS does. False
        models a store that answers malformed: orbax's second save to it fails (tensorstore:
        "Malformed StorageGeneration").
    """
    # Both are in the dev extra: a missing one fails here, it is not skipped.
    import gcp_storage_emulator  # noqa: F401
    import gcsfs  # noqa: F401 - epath's gs:// backend

    port = free_port()
    argv = [sys.executable, __file__, str(port)] + ([] if generation_header else ["--malformed"])
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o", timeout=5):
                break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError(
                    f"the GCS emulator did not start (exit {server.poll()})"
                ) from None
            time.sleep(0.1)
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath) and google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's array writes)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "abc",  # tensorstore: no credential lookup
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # the emulator has no storage-control API
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
        server.kill()
        server.wait()


def _serve(port: int, generation_header: bool = True) -> None:
    """The emulator's process: serves until killed."""
    from gcp_storage_emulator import server as server_module

    if generation_header:
        send_generation_headers(server_module)
    server = server_module.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket=BUCKET)  # fmt: skip
    server.run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), generation_header="--malformed" not in sys.argv[2:])
