"""The one exception type the scripts turn into a one-line message and exit code 2, a parser to match,
and how a script ends when it is stopped: Ctrl-C (SIGINT), SIGTERM (kill, timeout, a batch scheduler, a
container stop) and SIGHUP all unwind the program where it was, so every ``with``/``finally`` cleans up
(the partial run folder, the demo's temporary images), then one line and exit code 128 + the signal."""
from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

__all__ = ["ArgumentParser", "Stopped", "UserError", "parse_batches", "run_script"]


class UserError(Exception):
    """Bad input from the user (path, name, value); the message is a single line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line (exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parse_batches(flag: str, text: str) -> list[int]:
    """Batch sizes from ``1,32`` (sorted, unique); anything but positive integers is a UserError."""
    if not re.fullmatch(r"\s*[1-9]\d*(\s*,\s*[1-9]\d*)*\s*", text):
        raise UserError(f"{flag} {text!r}: expected positive integers separated by commas, e.g. 1,32")
    return sorted({int(b) for b in text.split(",")})


class Stopped(BaseException):
    """A termination signal, raised where the program was (a BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop(signum: int, frame: object) -> None:
    for sig in _STOP_SIGNALS:  # a second signal must not interrupt the cleanup the first one started
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def run_script(action: Callable[[], object], user_errors: tuple[type[Exception], ...] = (UserError,)) -> int:
    """A script's body: ``action``'s result (unless None) printed as the last line (exit 0); bad input one
    line (exit 2); Ctrl-C, SIGTERM or SIGHUP one line (exit 130, 143, 129) after everything cleaned up."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    # A signal the caller set to be ignored stays ignored: `nohup` ignores SIGHUP so that closing the
    # terminal does not stop the run (Python leaves an ignored SIGINT alone for the same reason).
    previous = {sig: signal.signal(sig, _stop) for sig in _STOP_SIGNALS if signal.getsignal(sig) != signal.SIG_IGN}
    try:
        result = action()
    except user_errors as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Stopped as stop:
        print(f"stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result is not None:  # None: nothing to report (a torchrun process other than rank 0)
        print(result)
    return 0
