"""Run folders appear complete or not at all, and never replace an earlier one."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from utils.run_dir import RunDir, atomic_path, write_json_atomic


def test_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with RunDir(tmp_path) as run:
            (run.path / "qvit_summary.json").write_text("{")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_runs_in_the_same_second_get_distinct_folders(tmp_path):
    finals = []
    for i in range(3):
        with RunDir(tmp_path) as run:
            write_json_atomic(run.path / "qvit_summary.json", {"i": i})
        finals.append(run.final)
    assert len(set(finals)) == 3
    assert [json.loads((f / "qvit_summary.json").read_text())["i"] for f in finals] == [0, 1, 2]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_atomic_json_leaves_no_partial_file(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(target, {"ok": 1})
    assert json.loads(target.read_text()) == {"ok": 1}


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_atomic_path_is_complete_or_absent(tmp_path, kind):
    target = tmp_path / "out" / ("plot.png" if kind == "file" else "plots")

    def write(path):
        if kind == "file":
            path.write_bytes(b"png")
        else:
            path.mkdir()
            (path / "a.png").write_bytes(b"png")

    with pytest.raises(KeyboardInterrupt), atomic_path(target, suffix=".png" if kind == "file" else "") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and not tmp.exists()
        write(tmp)
        raise KeyboardInterrupt  # interrupted half-way: nothing is left, not even the hidden path
    assert list(target.parent.iterdir()) == []
    with atomic_path(target, suffix=".png" if kind == "file" else "") as tmp:
        assert tmp.suffix == (".png" if kind == "file" else ".partial")
        write(tmp)
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    assert (target.read_bytes() if kind == "file" else (target / "a.png").read_bytes()) == b"png"


def test_stale_partial_folders_of_dead_owners_are_removed_by_the_next_run(tmp_path, caplog):
    import json
    import socket
    import subprocess
    import sys

    from utils.run_dir import OWNER_FILE

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    host = socket.gethostname()

    def partial(name: str, owner: dict | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "qvit_results.txt").write_text("half-written")
        if owner is not None:
            (folder / OWNER_FILE).write_text(json.dumps(owner))
        return folder

    stale = partial(".partial-killed", {"pid": int(dead.stdout), "host": host, "started": "2026-11-28T10:00:00+0000"})
    live = partial(".partial-running", {"pid": os.getpid(), "host": host, "started": "now"})
    elsewhere = partial(".partial-other-host", {"pid": int(dead.stdout), "host": host + "-elsewhere"})
    unknown = partial(".partial-no-owner", None)
    finished = tmp_path / "20261128-100000"
    finished.mkdir()
    with caplog.at_level("WARNING", logger="utils.run_dir"), RunDir(tmp_path) as run:
        assert json.loads((run.path / OWNER_FILE).read_text())["pid"] == os.getpid()
        (run.path / "a.txt").write_text("x")
    assert not stale.exists() and live.exists() and elsewhere.exists() and unknown.exists() and finished.exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"removed {stale}, left by process {int(dead.stdout)} (started 2026-11-28T10:00:00+0000), which ended without cleaning up"
    ]
    assert sorted(p.name for p in run.final.iterdir()) == ["a.txt"]  # a finished run carries no owner file


def test_a_full_disk_mid_run_is_one_line_and_leaves_nothing(tmp_path):
    import errno

    from utils.errors import UserError

    with pytest.raises(UserError, match=r"writing the run folder failed \(No space left on device\); nothing was kept$"):
        with RunDir(tmp_path) as run:
            write_json_atomic(run.path / "qvit_summary.json", {"ok": 1})
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run.path / "qvit_statistics.csv"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):  # a program error stays what it is (and still leaves nothing)
        with RunDir(tmp_path):
            raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_a_log_dir_that_cannot_be_created_is_one_line(tmp_path):
    from utils.errors import UserError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"file/log: cannot create a run folder there \(Not a directory\)$"):
        with RunDir(blocker / "log"):
            pass
