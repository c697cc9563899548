"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
    blocks = _python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    ran = 0
    for code in blocks:
        if "torch_block" in code:  # needs PyTorch and a trained package model
            continue
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
        ran += 1
    assert ran >= 2
    assert namespace["y"].shape == (32, 24, 1024)
    assert namespace["y2"].shape == (10, 128)
