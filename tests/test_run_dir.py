"""Run folders appear complete or not at all, and never replace an earlier one."""
from __future__ import annotations

import json

import pytest

from utils.run_dir import RunDir, write_json_atomic


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
