"""User-facing errors: one line on stderr, a non-zero exit code, no traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and how to fix it."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's main, turning a UserError into a one-line message and exit code 2."""
    try:
        main(argv)
    except UserError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    finally:
        from difftune import runlock  # here, not at the top: runlock raises UserError

        runlock.release_all()
