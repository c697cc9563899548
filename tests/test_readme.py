"""The Python examples of README.md and docs/*.md run as written, from the repository root."""

import pathlib
import re

import numpy as np
import pytest
from train_helpers import tiny_config, toy_features

ROOT = pathlib.Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # a fixed order


def _python_blocks(page):
    """The page's ```python blocks, each padded so that tracebacks give the page's line numbers."""
    text = page.read_text()
    return [
        "\n" * text.count("\n", 0, m.start(1)) + m.group(1)
        for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)
    ]


def _run(code, page, namespace):
    exec(compile(code, str(page), "exec"), namespace)  # noqa: S102


def test_examples_run(monkeypatch):
    """Each page's blocks run in order in one namespace per page (a page stands alone)."""
    monkeypatch.chdir(ROOT)  # the pages' paths are relative to the repository root
    namespaces: dict[str, dict] = {}
    blocks = ran = 0
    for page in PAGES:
        namespace = namespaces.setdefault(page.relative_to(ROOT).as_posix(), {})
        for code in _python_blocks(page):
            blocks += 1
            if "torch_block" in code:  # needs PyTorch and a trained package model
                continue
            if "Predictor.from_run" in code:  # needs a finished run: test_inference_example
                continue
            _run(code, page, namespace)
            ran += 1
    assert blocks >= 5
    assert ran >= 3
    readme, encoders = namespaces["README.md"], namespaces["docs/data_and_encoders.md"]
    assert readme["y"].shape == (32, 24, 1024)
    assert readme["y2"].shape == (10, 128)
    assert encoders["hs"].shape == (1, 3, 5, 64)  # the tiny Llama: embeddings + 2 layers


def _slug(heading):
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    """Every relative link of the pages names a file of the checkout (and a heading of it)."""
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                prose = re.sub(r"```.*?```", "", file.read_text(), flags=re.S)
                headings = re.findall(r"^#+ (.*)$", prose, flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target}")
    assert not broken


@pytest.mark.slow
def test_inference_example(tmp_path, monkeypatch):
    """The Inference block, on a run of [6, 384] features like the main job's (``make run``)."""
    from train import config as config_lib
    from train import trainer

    data = toy_features(tmp_path / "toy", n=40, layers=6, dim=384)
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", data, num_epochs=1))
    workdir = tmp_path / "out" / "default"
    trainer.run(config, workdir, progress=False)
    ((page, block),) = [
        (page, b)
        for page in PAGES
        for b in _python_blocks(page)
        if "Predictor.from_run" in b and "out/default/pang_lee_polarity/" in b
    ]
    block = block.replace("out/default/pang_lee_polarity/", "out/default/toy/")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    _run(block, page, namespace)
    assert namespace["logits"].shape == (3, 2)
    np.testing.assert_allclose(
        namespace["logits"], namespace["predictor"].logits(np.zeros((3, 6, 384))), atol=1e-6
    )
