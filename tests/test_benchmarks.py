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


def test_the_training_program_alone_takes_every_step_of_its_epochs():
    """loop_efficiency's "program alone" row times exactly the loop's training steps."""
    from benchmarks import loop_efficiency
    from train import config as config_lib
    from train import feeds
    from train.steps import Steps

    config = config_lib.load("configs/default.py:runlocal")
    source, classes, shape, folds = loop_efficiency.synthetic_source(n=40, shape=(4, 16))
    steps = Steps(config, classes, shape)
    feed = feeds.make_feed(steps, source, classes, "auto")
    plan = feeds.Plan(tuple(t for t, _ in folds[:3]), tuple(v for _, v in folds[:3]), (0, 1, 2))
    seconds, taken = loop_efficiency.program_only_seconds(steps, feed, plan, epochs=2)
    assert seconds > 0
    assert taken == 2 * int(feeds.steps_per_epoch(plan, steps.batch_size).sum())
