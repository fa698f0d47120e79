"""The one exception type the scripts turn into a one-line message and exit code 2, and a parser to match."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

__all__ = ["ArgumentParser", "UserError", "run_script"]


class UserError(Exception):
    """Bad input from the user (path, name, value); the message is a single line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line (exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def run_script(action: Callable[[], object], user_errors: tuple[type[Exception], ...] = (UserError,)) -> int:
    """A script's body: ``action``'s result (unless None) printed as the last line (exit 0); bad input one line (exit 2)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    try:
        result = action()
    except user_errors as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result is not None:  # None: nothing to report (a torchrun process other than rank 0)
        print(result)
    return 0
