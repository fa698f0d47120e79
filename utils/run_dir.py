"""Run folders written atomically: all files go to a hidden partial folder renamed into place at the end.

A run that fails or is interrupted leaves nothing behind, and an earlier run folder is never touched:
the final name is ``<log_dir>/<YYYYmmdd-HHMMSS>`` with ``-2``, ``-3``, ... appended if it exists.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RunDir", "atomic_path", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


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
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=self.log_dir, prefix=".partial-"))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
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
