"""``python -m train --config configs/<name>.py --workdir DIR [--config.<key> <value> ...]``.

Runs every fold and seed of the config (:func:`train.trainer.run`), resuming whatever a previous
invocation of the same command left unfinished, and prints the cross-validated results table.
The config is checked against the data, the model's shapes and the workdir before any work
(``--check-only`` stops there): a user error prints ``error: <cause and fix>`` in one line and
exits with status 2 (``--debug`` shows the traceback instead). So does a failed save (a store
that answers malformed, a full or read-only disk): the line names the store, the cause and the
last verified checkpoint, which rerunning the same command resumes from; orbax's and
tensorstore's own reports of it are held back.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence

from app import cli
from train import config as config_lib


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (the convention of :mod:`app.cli`)."""
    parser = cli.Parser("python -m train", __doc__.split("\n")[0], config_overrides=True)
    parser.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
    parser.add_argument("--workdir", required=True, help="folder for checkpoints and results")
    parser.add_argument("--mesh", default=None, help="device mesh, e.g. runs=-1 or data=-1,model=2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="check the config, its data, the model's shapes and the workdir, then exit",
    )
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
        from train import checkpointing, trainer

        checked = trainer.check(config, args.workdir)
        if args.check_only:
            print(f"{args.config}: the config, its data and the model's shapes check out.")
            return 0
        # A failed save is reported in one line; --debug keeps orbax's own reports of it.
        quiet = contextlib.nullcontext() if args.debug else checkpointing.quiet_failed_saves()
        with quiet:
            trainer.run(config, args.workdir, progress=not args.no_progress, checked=checked)
        print(f"wall time: {time.perf_counter() - start:.0f} s")
        return 0

    return cli.run(work, debug=args.debug, user_error=lambda err: cli.user_error(err, args.workdir))


if __name__ == "__main__":
    sys.exit(main())
