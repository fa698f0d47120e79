"""The one exception type the scripts turn into a one-line message and exit code 2, and a parser to match."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["UserError", "ArgumentParser"]


class UserError(Exception):
    """Bad input from the user (path, name, value); the message is a single line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line (exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
