"""Run folders written atomically: all files go to a hidden partial folder renamed into place at the end.

A run that fails or is interrupted leaves nothing behind, and an earlier run folder is never touched:
the final name is ``<log_dir>/<YYYYmmdd-HHMMSS>`` with ``-2``, ``-3``, ... appended if it exists.
A partial folder records its owner (pid, host, start time) in ``.owner.json``; a run that could not
clean up (SIGKILL, power loss) leaves it behind, and the next run in the same log dir removes it once
that process is gone from this host, saying so in one line. A finished run has no owner file and is
never touched.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.errors import UserError

__all__ = ["RunDir", "atomic_path", "remove_stale_partials", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]

log = logging.getLogger(__name__)

OWNER_FILE = ".owner.json"
# What a full or unwritable file system raises while a run writes (the run's own bugs stay tracebacks).
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A hidden, not yet existing path beside ``path`` to write a file or a folder at, in any way (a
    library's save function, a copy); renamed onto ``path`` when the block ends without an error and
    removed otherwise, so that ``path`` is either complete or absent. ``suffix`` keeps an extension
    for writers that infer the format from it (``.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, synced, then renamed into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class RunDir:
    """``with RunDir(log_dir) as run: write into run.path``; on success ``run.final`` is the folder."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.path: Path | None = None
        self.final: Path | None = None
        self.stamp = ""

    def __enter__(self) -> "RunDir":
        self.stamp = time.strftime("%Y%m%d-%H%M%S")  # when the run started
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.log_dir)
            self.path = Path(tempfile.mkdtemp(dir=self.log_dir, prefix=".partial-"))
        except OSError as exc:
            raise UserError(f"{self.log_dir}: cannot create a run folder there ({exc.strerror or exc})") from None
        try:
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_json_atomic(self.path / OWNER_FILE, owner)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in _WRITE_ERRORS:  # disk full, quota, read-only: one line
                raise UserError(f"{self.log_dir}: writing the run folder failed ({exc.strerror}); nothing was kept") from None
            return
        (self.path / OWNER_FILE).unlink(missing_ok=True)  # a finished run has no owner to outlive
        for n in range(1, 1000):
            final = self.log_dir / (self.stamp if n == 1 else f"{self.stamp}-{n}")
            try:
                # rename() refuses a non-empty target on Linux and an existing one on Windows; an empty
                # directory created meanwhile by someone else is refused by the exists() check.
                if final.exists():
                    continue
                os.rename(self.path, final)
            except OSError:
                continue
            self.final = final
            return
        shutil.rmtree(self.path, ignore_errors=True)
        raise RuntimeError(f"no free run folder name under {self.log_dir}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def remove_stale_partials(log_dir: Path) -> list[Path]:
    """Remove the partial run folders under ``log_dir`` whose owner process is gone from this host (one
    log line each); folders of live owners, of other hosts, or without an owner file stay. Returns the
    removed folders."""
    removed = []
    for folder in sorted(Path(log_dir).glob(".partial-*")):
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
            pid, host, started = int(owner["pid"]), str(owner["host"]), str(owner.get("started", "?"))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge
        if host != socket.gethostname() or _alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("removed %s, left by process %d (started %s), which ended without cleaning up", folder, pid, started)
        removed.append(folder)
    return removed
