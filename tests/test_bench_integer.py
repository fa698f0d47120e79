"""bench/bench_integer.py's refusals: one line, exit 2, before any model is built (its timings are a
benchmark, run by hand: docs/integer.md)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, run_in_process
from test_cli import assert_user_error


@pytest.mark.parametrize("args,message", [
    (["--recipe", "trt_int8"], r"--recipe trt_int8: recipe trt_int8 keeps the layernorm_input kind in float"),
    (["--recipe", "nosuch"], r"config 'nosuch' not found"),
    (["--batches", "1,x"], r"--batches"),
    (["--data", "/nonexistent"], r"--data /nonexistent: no train/ folder"),
    (["--json", "/nonexistent/dir/out.json"], r"--json /nonexistent/dir/out.json: no such directory"),
])  # fmt: skip
def test_bench_integer_refuses_bad_arguments_in_one_line(args, message, tmp_path):
    assert_user_error(run_in_process("bench.bench_integer", *args), tmp_path / "nothing", message)


def test_bench_integer_refusal_as_a_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.bench_integer", "--recipe", "nosuch"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert_user_error(result, tmp_path / "nothing", r"config 'nosuch' not found")
