"""Errors a user can act on, and how a command reports them: one ``error:`` line, exit status 2.

Every module raises a subclass of :class:`UserError` for a problem the user can fix (a bad key,
a missing file, a full disk); :func:`run_command` turns it into one line on stderr. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """A problem the user can fix; the command prints its one-line message and exits with status 2.
    Under torchrun every rank meets the same problem (the same config, files and collectives), so
    only global rank 0 prints it; a subclass with ``local = True`` is printed by any rank."""

    local = False


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key."""


class DataError(UserError):
    """A dataset folder, token file or meta.json that cannot be used as it is."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, from another run, or cannot be written."""


class TokenizerError(UserError, ValueError):
    """Tokenizer files that cannot be loaded, or text that does not fit the vocabulary."""


class PrepareError(UserError):
    """A data preparation problem: a source, a download or an output folder."""


class ExportError(UserError):
    """A model or target folder that cannot be exported as asked."""


class PeerError(UserError):
    """A collective failed because another process of the run died, hung or dropped off the network."""


class Interrupted(UserError):
    """A stop signal that ends the command at once (before training started, or a second Ctrl-C)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def first_line(e: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's text, shortened at a word boundary when longer than ``limit``."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit - 3)
    return line[:cut if cut > limit // 2 else limit - 3].rstrip(" ,;:") + "..."


def _global_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def run_command(fn, argv: list[str] | None) -> None:
    """Run a command's ``fn(argv)``. A UserError becomes one ``error:`` line and exit status 2
    (under torchrun printed by global rank 0 alone, see :class:`UserError`); a stop signal that
    ended the command at once exits with 128 + its number."""
    try:
        fn(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        rank = _global_rank()
        if rank == 0 or e.local:
            print("error: %s%s" % ("rank %d: " % rank if rank else "", e), file=sys.stderr, flush=True)
        sys.exit(128 + e.signum if isinstance(e, Interrupted) else 2)
    except KeyboardInterrupt:
        if _global_rank() == 0:
            print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
