"""User-facing errors: one line on stderr, a non-zero exit code, no traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from difftune.cli import quiet

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports it
_on_exit: list[Callable[[], None]] = []


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and how to fix it."""


def on_exit(release: Callable[[], None]) -> None:
    """Have `run_cli` call `release` when the script ends, however it ends (once, however often registered):
    how a resource held until exit (an output folder's lock) is let go by runs inside one process."""
    if release not in _on_exit:
        _on_exit.append(release)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's main, turning a UserError into a one-line message and exit code 2; the libraries' messages
    a user cannot act on are dropped first (difftune.cli.quiet), as some come at their import."""
    quiet.install()
    try:
        main(argv)
    except UserError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:  # Ctrl-C while loading or caching (in training, the loop stops and saves on the first)
        if os.environ.get("RANK", "0") == "0":
            message = "error: interrupted (Ctrl-C); nothing is damaged: every checkpoint already written is intact"
            print(message, file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    finally:
        for release in _on_exit:
            release()
