"""``python -m train --config configs/<name>.py --workdir DIR [--config.<key>=<value> ...]``.

Runs every fold and seed of the config, resuming whatever a previous invocation left unfinished,
and prints the cross-validated results table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from train import config as config_lib


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="configs/<name>.py")
    parser.add_argument("--workdir", required=True, help="folder for checkpoints and results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host: TPU pods, SLURM, ...)",
    )
    args, overrides = config_lib.parse_args_with_overrides(parser, argv)
    try:
        config = config_lib.load(args.config)
        config_lib.apply_overrides(config, overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.distributed:
        import jax

        jax.distributed.initialize()
    from train import cross_validation

    start = time.perf_counter()
    try:
        cross_validation.run(config, args.workdir, progress=not args.no_progress)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
