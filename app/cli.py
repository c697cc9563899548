"""What every command line of the project shares: one-line errors, ``--debug``, overrides, meshes.

The convention (``python -m train``, ``train.reproduce``, ``data.extract``,
``data.import_features``; the library's ``gaam_jax.encoders.convert`` keeps it on its own):

* a user error, a bad flag included, is one line ``error: <cause and fix>`` on stderr, exit 2,
  found before any work or any file is written; ``--debug`` shows the traceback instead;
* Ctrl-C is one line, exit 130;
* config overrides are ``--config.key=value`` or ``--config.key value`` (as absl and big_vision
  accept them);
* a device mesh is ``--mesh data=-1,model=2`` (axis sizes, one of them possibly -1).
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence

INTERRUPTED = "interrupted: the same command resumes from the last checkpoint."


class UserError(Exception):
    """An error the user can fix (a config, a store, a diverged run): one line, exit 2.

    The project's errors of that kind subclass it (``train.config.ConfigError``,
    ``train.progress.NonFiniteLossError``, ``train.checkpointing.SaveError``).
    """

    def line(self) -> str:
        """The line a command prints after ``error:``."""
        return str(self)


def disk_full(err: BaseException) -> bool:
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
    """The one line for an error of a command that writes into ``workdir``, or None for a bug.

    :class:`UserError` s say their own line; a full disk, a denied permission and a missing
    file are the user's to fix too.
    """
    if isinstance(err, UserError):
        return err.line()
    if disk_full(err):
        return (
            f"the disk holding {workdir} is full; free space and rerun the same command "
            "(it resumes from the last checkpoint)."
        )
    if isinstance(err, PermissionError):
        return f"permission denied: {err.filename or err}; choose a --workdir you can write."
    if isinstance(err, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return one_line(err)
    return None


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """``argparse`` with the project's conventions: one-line usage errors (exit 2), ``--debug``.

    Args:
      prog: the command, e.g. ``python -m train``.
      description: one line.
      config_overrides: accept ``--config.key value`` / ``--config.key=value`` (collected by
        :meth:`parse`).
    """

    def __init__(self, prog: str, description: str, *, config_overrides: bool = False):
        super().__init__(prog=prog, description=description)
        self.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
        self.config_overrides = config_overrides

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")

    def parse(self, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
        """The arguments and the config overrides (``key=value``); usage errors exit 2."""
        args, rest = self.parse_known_args(argv)
        overrides: list[str] = []
        i = 0
        while i < len(rest):
            item = rest[i]
            if not (self.config_overrides and item.startswith("--config.")):
                self.error(f"unrecognised argument {item!r}")
            key = item.removeprefix("--config.")
            if "=" not in key:  # --config.key value
                if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                    self.error(f"{item} needs a value: --config.{key}=VALUE or {item} VALUE")
                key, i = f"{key}={rest[i + 1]}", i + 1
            overrides.append(key)
            i += 1
        return args, overrides


def parse_mesh(text: str) -> dict[str, int]:
    """``'data=-1,model=2'`` -> ``{'data': -1, 'model': 2}`` (the commands' ``--mesh``).

    Raises:
      ValueError: naming the malformed or repeated entry.
    """
    mesh: dict[str, int] = {}
    for entry in text.split(","):
        name, sep, size = (part.strip() for part in entry.partition("="))
        try:
            if not sep or not name.isidentifier():
                raise ValueError
            value = int(size)
        except ValueError:
            raise ValueError(
                f"--mesh {text!r}: {entry.strip()!r} is not axis=size with an integer size; "
                "e.g. --mesh data=-1,model=2."
            ) from None
        if name in mesh:
            raise ValueError(f"--mesh {text!r}: axis {name!r} is given twice.")
        mesh[name] = value
    return mesh


def run(
    work: Callable[[], int | None],
    *,
    debug: bool,
    user_error: Callable[[BaseException], str | None],
) -> int:
    """Runs a command's work with the convention's exits.

    Args:
      work: the command; returns its exit code (None: 0).
      debug: re-raise instead of printing one line.
      user_error: the one-line message for an exception that is the user's to fix, or None for
        a bug (re-raised with its traceback).

    Returns:
      The exit code: ``work``'s, 2 for a user error, 130 for Ctrl-C.
    """
    try:
        return work() or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs
        message = None if debug else user_error(err)
        if message is None:
            raise
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 2
