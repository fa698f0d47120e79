"""The one exception type the scripts turn into a one-line message and exit code 2."""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user (path, name, value); the message is a single line."""
