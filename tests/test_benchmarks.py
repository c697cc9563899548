"""Smoke test: every benchmark section runs once on tiny sizes (no timing assertions)."""

import pytest

from benchmarks import run


@pytest.mark.slow
def test_benchmarks_run_quick(tmp_path, capsys):
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    for section in (
        "1. GAAM mixture layer",
        "2. Against the memory",
        "3. Scaling",
        "4. The decoder",
        "5. bfloat16",
    ):
        assert section in text
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_device_benchmark_runs_quick(capsys):
    from benchmarks import device_gaam

    assert device_gaam.main(["--quick"]) == 0
    assert "copy GB/s (this card)" in capsys.readouterr().out


@pytest.mark.slow
def test_encoder_scale_13b_section_runs_quick():
    from benchmarks import encoder_scale

    table = encoder_scale.section_13b(quick=True)  # 8 fake devices (conftest): meshes 1 to 8
    assert table.count("GiB") == 12
