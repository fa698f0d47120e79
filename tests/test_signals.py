"""A run stopped by a signal (SIGTERM from kill/timeout/a scheduler, SIGHUP, Ctrl-C) ends clean: one line,
exit 128 + signal, no partial run folder, no temporary demo images."""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT


def start_demo(tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONUNBUFFERED": "1"}
    (tmp_path / "tmp").mkdir()
    cmd = [sys.executable, str(ROOT / "test_qvit.py"), "--demo", "--no-progress", "--workers", "0", "--log-dir", str(tmp_path / "log")]
    # Each stop signal at its default, as in a terminal: started from a background job, the child would
    # inherit an ignored SIGINT (and under nohup an ignored SIGHUP), which it rightly keeps ignoring.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def wait_for(process: subprocess.Popen, text: str, timeout: float = 240) -> str:
    """Read the process's stdout until a line contains ``text``; returns what was read."""
    seen = []
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=1):
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
            if text in line:
                return "".join(seen)
    process.kill()
    raise AssertionError(f"{text!r} never printed; stdout so far: {''.join(seen)!r}")


@pytest.mark.slow
@pytest.mark.parametrize("stage,signum", [("Calibrating on", signal.SIGTERM), ("Evaluating FP32 and INT8", signal.SIGTERM),
                                          ("Calibrating on", signal.SIGHUP), ("Calibrating on", signal.SIGINT)],
                         ids=["sigterm-calibration", "sigterm-evaluation", "sighup", "sigint"])  # fmt: skip
def test_a_stopped_run_leaves_nothing_and_says_why(tmp_path, stage, signum):
    process = start_demo(tmp_path)
    wait_for(process, stage)
    time.sleep(0.5)  # inside that stage's work
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    expected = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    assert stderr.strip().splitlines()[-1] == expected
    log = tmp_path / "log"
    assert not log.exists() or list(log.iterdir()) == []  # no run folder, no hidden partial one
    assert list((tmp_path / "tmp").iterdir()) == []  # the demo's generated images are gone


def test_a_signal_the_caller_ignores_stays_ignored(capsys):
    # nohup ignores SIGHUP so that a closed terminal does not stop the run; SIGTERM still stops it.
    from utils.errors import run_script

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        def hang_up() -> str:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)  # the signal is delivered by now; ignored, it changes nothing
            return "done"

        assert run_script(hang_up) == 0
        assert capsys.readouterr().out.strip() == "done"
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN

        def terminate() -> str:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            return "not reached"

        assert run_script(terminate) == 128 + signal.SIGTERM
        assert capsys.readouterr().err.strip() == "stopped by SIGTERM"
    finally:
        signal.signal(signal.SIGHUP, previous)
