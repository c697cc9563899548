"""The training CLI: one-line errors before any work, and workdirs that know their config.

Every user error exits with status 2 and prints exactly one line, ``error: ...``, to stderr,
before any file is written.
"""

import errno
import json
import pathlib

import pytest
from train_helpers import tiny_config

from train import __main__ as cli
from train import checkpointing, runs
from train import config as config_lib


def _tree(folder: pathlib.Path) -> dict:
    """Every file under ``folder`` with its bytes (and every folder), to compare states."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "override,message",
    [
        ("checkpoint_every_epochs=0", "checkpoint_every_epochs must be at least 1"),
        ("num_epochs=0", "num_epochs must be at least 1"),
        ("runs_per_program=-1", "runs_per_program must be at least 0"),
        ("model.num_heads=3", "does not fit toy's [4, 16] examples"),
        ("model.front=foo", "model.front must be one of"),
        ("model.dtype=float16", "model.dtype must be one of"),
        ("loss=foo", "loss must be one of"),
        ("batch_size=1000", "batch_size 1000 exceeds the 40 training examples"),
        ("cv.k=1", "cv.k must be at least 2"),
        ("cv.k=41", "cv.k 41 exceeds 40, the size of toy's smallest class"),
        ("optimizer.frozen=('^nothing/',)", "matches no parameter"),
        ("optimizer.learning_rate=0.0", "optimizer.learning_rate must be positive"),
        ("cv.kind=leave_one_group_out", "leave-one-group-out needs at least 2 groups"),
        ("model.fron=gaam", "unknown config key 'model.fron' (did you mean 'model.front'?)"),
        ("num_epochs=x", "invalid literal for int()"),
        ("dataset_paths.toy=/nowhere", "python -m data.extract"),
    ],
)
def test_each_bad_value_is_one_line_before_any_file(toy, tmp_path, capsys, override, message):
    cfg = tiny_config(tmp_path / "cfg.py", toy)
    workdir = tmp_path / "w"
    argv = ["--config", str(cfg), "--workdir", str(workdir), f"--config.{override}"]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert message in line, line
    assert not workdir.exists()


def test_broken_configs_and_workdirs(toy, tmp_path, capsys):
    (tmp_path / "plain.py").write_text("def get_config():\n    return {'a': 1}\n")
    assert cli.main(["--config", str(tmp_path / "plain.py"), "--workdir", str(tmp_path / "w")]) == 2
    assert "return an ml_collections.ConfigDict" in _error_line(capsys)
    assert cli.main(["--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path / "w")]) == 2
    assert "does not exist" in _error_line(capsys)
    cfg = tiny_config(tmp_path / "cfg.py", toy)
    (tmp_path / "file").write_text("mine")
    assert cli.main(["--config", str(cfg), "--workdir", str(tmp_path / "file")]) == 2
    assert "is a file" in _error_line(capsys)
    assert (tmp_path / "file").read_text() == "mine"
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_changed_config_is_refused_and_the_workdir_untouched(toy, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=1, checkpoint_every_steps=0)
    workdir = tmp_path / "w"
    base = ["--config", str(cfg), "--workdir", str(workdir), "--no-progress"]
    assert cli.main([*base, "--config.model.front=mha", "--config.cv.k=2"]) == 0
    before = _tree(workdir)
    capsys.readouterr()
    assert cli.main([*base, "--config.model.front=gaam", "--config.num_epochs=5"]) == 2
    line = _error_line(capsys)
    assert "config.model.front" in line and "config.num_epochs" in line, line
    assert _tree(workdir) == before
    # The same command reports again (nothing is retrained); a progress-only change is allowed,
    # and so is a change of the checkpoint interval (results cannot change).
    assert cli.main([*base, "--config.model.front=mha", "--config.checkpoint_every_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "| toy |" in out
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["config"]["model"]["front"] == "mha"
    assert set(recorded["data"]) == {"toy"} and len(recorded["data"]["toy"]["fingerprint"]) == 64


def test_changed_data_is_refused(toy, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=1)
    workdir = tmp_path / "w"
    workdir.mkdir()
    recorded = runs.identity(config_lib.load(cfg))  # as if made from data since rebuilt
    recorded["data"]["toy"]["fingerprint"] = "0" * 64
    (workdir / "config.json").write_text(json.dumps(recorded))
    assert cli.main(["--config", str(cfg), "--workdir", str(workdir)]) == 2
    line = _error_line(capsys)
    assert "(differing: data.toy.fingerprint)" in line and "another config" in line


@pytest.mark.slow
def test_a_full_disk_is_one_line(toy, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "write_json_atomic", full)  # a checksum record
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=1)
    assert cli.main(["--config", str(cfg), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "is full; free space and rerun the same command" in line


def test_debug_shows_the_traceback(toy, tmp_path):
    cfg = tiny_config(tmp_path / "cfg.py", toy)
    with pytest.raises(Exception, match="num_epochs must be at least 1"):
        cli.main(["--config", str(cfg), "--workdir", str(tmp_path / "w"), "--debug",
                  "--config.num_epochs=0"])  # fmt: skip


def test_ctrl_c_is_one_line_and_exit_130(toy, tmp_path, capsys, monkeypatch):
    from train import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_program", interrupted)
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=1)
    assert (
        cli.main(["--config", str(cfg), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 130
    )
    assert capsys.readouterr().err.strip() == (
        "interrupted: the same command resumes from the last checkpoint."
    )


def _exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize(
    "module", ["train.__main__", "train.reproduce", "data.extract", "data.import_features",
               "gaam_jax.encoders.convert"],
)  # fmt: skip
def test_every_cli_has_one_convention(module, capsys):
    """A bad flag is one line ``error: ...`` with exit 2 in every command, and --debug exists."""
    import importlib

    main = importlib.import_module(module).main
    assert _exit_code(main, ["--no-such-flag", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--help" in err[0], err
    assert _exit_code(main, ["--help"]) == 0
    assert "--debug" in capsys.readouterr().out


def test_config_overrides_take_either_form(toy, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "cfg.py", toy)
    # "--config.key value" as absl and big_vision accept it: the value is checked like "=".
    assert cli.main(["--config", str(cfg), "--workdir", str(tmp_path / "w"),
                     "--config.num_epochs", "0"]) == 2  # fmt: skip
    assert "num_epochs must be at least 1" in _error_line(capsys)
    assert (
        _exit_code(cli.main, ["--config", str(cfg), "--workdir", "w", "--config.num_epochs"]) == 2
    )
    assert "needs a value" in _error_line(capsys)
    assert cli.main(["--config", str(cfg), "--workdir", str(tmp_path / "w"), "--mesh", "data"]) == 2
    assert "is not axis=size" in _error_line(capsys)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_second_job_on_a_busy_workdir_is_refused(toy, tmp_path, capsys):
    """Two commands on one workdir at once: the second is one line, exit 2, and touches
    nothing; the first finishes; once it has, the same command reads its results."""
    import subprocess
    import sys
    import time

    # Long enough that the first is still training when the second (in this process, no
    # imports to wait for) has validated.
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=10, checkpoint_every_epochs=5)
    args = ["--config", str(cfg), "--workdir", str(tmp_path / "w"), "--no-progress"]
    root = pathlib.Path(__file__).parents[2]
    first = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lock = tmp_path / "w" / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    capsys.readouterr()
    code = cli.main(args)
    line = _error_line(capsys)
    assert first.wait(timeout=300) == 0, first.stdout.read().decode()
    assert code == 2 and "is in use by pid" in line
    assert cli.main(args) == 0 and "mean ± std" in capsys.readouterr().out
