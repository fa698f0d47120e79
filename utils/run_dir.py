"""Run folders written atomically: all files go to a hidden partial folder renamed into place at the end.

A run that fails or is interrupted leaves nothing behind, and an earlier run folder is never touched:
the final name is ``<log_dir>/<YYYYmmdd-HHMMSS>`` with ``-2``, ``-3``, ... appended if it exists.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["RunDir", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
