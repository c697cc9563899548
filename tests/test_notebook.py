"""The research notebook runs, offline, from top to bottom (so it never goes stale)."""

import json
import os
import pathlib
import re
import sys

import nbclient
import nbformat
import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("GAAM_DATA_DIR", str(tmp_path / "data"))  # the kernel inherits it
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # One device, as a user's kernel has. The notebook runs more than it compiles (MiniLM over
    # 200 texts, 150 training steps): XLA's classic emitters at -O1 (tests/conftest.py; the
    # emitters only where XLA has the option) take it from 26 s with XLA's defaults, or 24 s with
    # the test flags, to 21 s.
    flags = "--xla_backend_optimization_level=1"
    if os.environ.get("GAAM_TEST_HAS_XLA_CPU_USE_FUSION_EMITTERS") == "1":
        flags += " --xla_cpu_use_fusion_emitters=false"
    monkeypatch.setenv("XLA_FLAGS", flags)
    # A kernel spec for this interpreter, so a user-level "python3" spec cannot be picked instead.
    spec = tmp_path / "jupyter" / "kernels" / "gaam-jax-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "gaam-jax test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="gaam-jax-test",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "functional == module: True" in text
    accuracies = [float(a) for a in re.findall(r"validation accuracy ([\d.]+)", text)]
    assert len(accuracies) == 5
    assert accuracies[-1] >= 0.65, accuracies  # 40 balanced sentences: chance is 0.5
