"""``lineguard-hub``: accounts and export commands on a real database, config errors, and
``serve`` end to end as a process (embedded broker, SQLite in a data dir, HTTP)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hub.cli import main
from lineguard_contract import SamplePayload, Topics, encode

TOPICS = Topics()


def run_cli(args: list[str], stdin: str = "", monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    import io

    assert monkeypatch is not None
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(args)


@pytest.mark.parametrize("args,stdin,code,message", [
    (["user", "add", "bob", "--role", "reviewer", "--password-stdin"], "long enough pw\n", 0, "user bob: created"),
    (["user", "add", "bob", "--role", "reviewer", "--password-stdin"], "short\n", 2, "at least 10"),
    (["user", "add", "bad name", "--role", "viewer", "--password-stdin"], "long enough pw\n", 2, "username"),
    (["user", "passwd", "nobody", "--password-stdin"], "long enough pw\n", 2, "no user"),
])
def test_user_commands(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                       args: list[str], stdin: str, code: int, message: str) -> None:
    rc = run_cli([*args, "--data-dir", str(tmp_path), "--database", db_url], stdin, monkeypatch)
    out = capsys.readouterr()
    assert rc == code
    assert message in out.out + out.err


def test_token_create_prints_a_token_once(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data-dir", str(tmp_path), "--database", db_url]
    assert run_cli(["token", "create", "ci", *common], "", monkeypatch) == 2  # no admin yet
    assert "--user is needed" in capsys.readouterr().err
    assert run_cli(["user", "add", "root", "--role", "admin", "--password-stdin", *common], "long enough pw\n",
                   monkeypatch) == 0
    capsys.readouterr()
    assert run_cli(["token", "create", "ci", *common], "", monkeypatch) == 0
    out = capsys.readouterr()
    assert re.fullmatch(r"lgt_[A-Za-z0-9_-]{43}\n", out.out)
    assert "acts as root" in out.err


@pytest.mark.parametrize("yaml_text,message", [
    ("http:\n  prot: 80\n", "http.prot"),
    ("databse_url: sqlite://\n", "databse_url"),
    ("production: true\n", "embedded broker"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str,
                                          message: str) -> None:
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(yaml_text)
    assert main(["migrate", "-c", str(cfg), "--data-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_heads_without_a_heads_section_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["heads", "--data-dir", str(tmp_path), "--broker", "mqtt://127.0.0.1:1"]) == 2
    assert "no heads section" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_runs_broker_ingest_and_ui_and_stops_on_sigint(tmp_path: Path, publisher: Any,
                                                            sample_factory: Callable[..., SamplePayload]) -> None:
    http_port, mqtt_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_HUB_ADMIN")}
    proc = subprocess.Popen([sys.executable, "-m", "hub.cli", "serve", "--data-dir", str(tmp_path / "hub"),
                             "--http-port", str(http_port), "--mqtt-port", str(mqtt_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while not any(line.startswith("demo login:") for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())
        user, password = lines[-1].split(":", 1)[1].strip().split(" / ")
        assert f"http://127.0.0.1:{http_port}/" in "".join(lines)
        assert (tmp_path / "hub" / "demo-login.txt").stat().st_mode & 0o077 == 0

        sample = sample_factory(seed=3)
        publisher(mqtt_port).publish(TOPICS.station(sample.station_id, "samples"), encode(sample))

        import http.cookiejar

        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        base = f"http://127.0.0.1:{http_port}"
        for _ in range(100):  # uvicorn may still be binding
            try:
                page = opener.open(f"{base}/login").read().decode()
                break
            except urllib.error.URLError:
                time.sleep(0.1)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        form = f"username={user}&password={password}&csrf_token={token}&next=/queue".encode()
        opener.open(urllib.request.Request(f"{base}/login", data=form)).read()
        deadline = time.monotonic() + 20
        while True:
            items = json.loads(opener.open(f"{base}/api/v1/samples").read())["items"]
            if items or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [i["sample_id"] for i in items] == [sample.sample_id]
        assert b"lineguard_hub_ingest_messages_total{outcome=\"stored\"} 1.0" in opener.open(f"{base}/metrics").read()
    except Exception as e:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        raise AssertionError(f"{e!r}; the hub printed:\n{''.join(lines)}{out}") from e
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, "".join(lines) + out
    with pytest.raises(OSError):  # the embedded broker is gone too
        import socket

        socket.create_connection(("127.0.0.1", mqtt_port), timeout=1).close()
