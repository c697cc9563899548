"""``python -m train --config configs/<name>.py --workdir DIR [--config.<key> <value> ...]``.

Runs every fold and seed of the config, resuming whatever a previous invocation of the same
command left unfinished, and prints the cross-validated results table. The config is validated
against the data, and the workdir against the config it records, before any work: a user error
prints ``error: <cause and fix>`` in one line and exits with status 2 (``--debug`` shows the
traceback instead). So does a failed save (a store that answers malformed, a full or read-only
disk): the line names the store, the cause and the last verified checkpoint, which rerunning
the same command resumes from; orbax's and tensorstore's own reports of it are held back.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import time
from collections.abc import Sequence

from gaam_jax import cli
from train import config as config_lib


def _disk_full(err: BaseException) -> bool:
    """Whether ``err`` or anything in its chain says the disk is full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "RESOURCE_EXHAUSTED" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def user_error(err: BaseException, workdir: str) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug."""
    from train.checkpointing import SaveError
    from train.loop import NonFiniteLossError

    if isinstance(err, config_lib.ConfigError | NonFiniteLossError):
        return str(err)
    if isinstance(err, SaveError):
        if _disk_full(err):
            step = err.last_verified
            where = (
                "starts over: no checkpoint was verified yet"
                if step is None
                else f"resumes from the last verified checkpoint, step {step}"
            )
            return (
                f"the disk holding {err.store} is full; free space and rerun the same command "
                f"(it {where})."
            )
        return str(err)
    if _disk_full(err):
        return (
            f"the disk holding {workdir} is full; free space and rerun the same command "
            "(it resumes from the last checkpoint)."
        )
    if isinstance(err, PermissionError):
        return f"permission denied: {err.filename or err}; choose a --workdir you can write."
    if isinstance(err, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return cli.one_line(err)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (the convention of :mod:`gaam_jax.cli`)."""
    parser = cli.Parser("python -m train", __doc__.split("\n")[0], config_overrides=True)
    parser.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
    parser.add_argument("--workdir", required=True, help="folder for checkpoints and results")
    parser.add_argument("--mesh", default=None, help="device mesh, e.g. runs=-1 or data=-1,model=2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host: TPU pods, SLURM, ...)",
    )
    args, overrides = parser.parse(argv)
    start = time.perf_counter()

    def work() -> int:
        config = config_lib.load(args.config, overrides)
        if args.mesh is not None:
            try:
                mesh = cli.parse_mesh(args.mesh)
            except ValueError as err:
                raise config_lib.ConfigError(str(err)) from None
            with config.unlocked():
                config.mesh = mesh
        if args.distributed:
            import jax

            jax.distributed.initialize()
        from train import checkpointing, cross_validation, finetune, validate

        progress = not args.no_progress
        # A failed save is reported in one line; --debug keeps orbax's own reports of it.
        quiet = contextlib.nullcontext() if args.debug else checkpointing.quiet_failed_saves()
        with quiet:
            if finetune.is_finetune(config):  # an encoder trains through its adapters
                datasets = finetune.prepare(config, args.workdir)
                finetune.run(config, args.workdir, datasets=datasets, progress=progress)
            else:
                datasets = validate.prepare(config, args.workdir)
                cross_validation.run(config, args.workdir, datasets=datasets, progress=progress)
        print(f"wall time: {time.perf_counter() - start:.0f} s")
        return 0

    return cli.run(work, debug=args.debug, user_error=lambda err: user_error(err, args.workdir))


if __name__ == "__main__":
    sys.exit(main())
