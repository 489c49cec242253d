"""How a user hears about trouble: a one-line `note:` for what was repaired or skipped (a stale
lock taken over, leftovers removed), and for a user's mistake one `error:` line naming the file,
tensor, record or key and what was expected, exit status 2, never a traceback
(LLAMA_JAX_TRACEBACK=1 shows it)."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

# What bad input raises once the code has named the thing (OSError: missing files, full disks,
# permissions; UnicodeError is a ValueError).
USER_ERRORS = (ValueError, KeyError, TypeError, OSError)


def note(message: str) -> None:
    """A one-line notice on stderr (clean-ups and take-overs a user should know about)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's key without repr quotes)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(text).split()) or type(error).__name__


def run_cli(main: Callable[..., Any], *args: Any) -> int:
    """Run a command's main; a user error prints `error: ...` on stderr and gives exit status 2."""
    try:
        main(*args)
    except USER_ERRORS as e:
        if os.environ.get("LLAMA_JAX_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0
