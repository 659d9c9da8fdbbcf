"""``make demo`` as a user runs it (through its launcher, deploy/demo.py): the hub with its
embedded broker and SQLite, one agent replaying the sample video; samples reach the review
queue, the demo login is printed, and both processes stop cleanly."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_demo_puts_defects_in_the_review_queue_and_stops_cleanly(tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "lineguard-hub").exists():
        pytest.skip("the lineguard-hub script is not installed next to this Python (make test installs it)")
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "demo.py"), "--seconds", "3", "--data-dir",
                           str(tmp_path), "--http-port", str(free_port()), "--mqtt-port", str(free_port())],
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "samples to review at http://127.0.0.1:" in out
    assert "demo login: demo / " in out
    assert out.rstrip().endswith("demo: stopped")
    agent_log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in agent_log and "Traceback" not in (tmp_path / "hub.log").read_text()
