"""``make demo``: the hub (embedded broker, SQLite) and one edge agent replaying the sample video
in a loop, on this machine. Prints the UI's URL and the demo login once the first defect sample
is in the review queue; Ctrl-C stops both (the agent first, so it can drain its outbox).

    python deploy/demo.py [--http-port 8080] [--mqtt-port 1883] [--data-dir out/demo] [--seconds N]

A port already in use is replaced by a free one (this machine may run its own Mosquitto on 1883).
``--seconds`` stops the demo on its own after N seconds of running with samples (for scripts);
the exit status is then 0 only if the hub received samples.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _pump(proc: subprocess.Popen[str], prefix: str, log: Path, seen: list[str]) -> None:
    assert proc.stdout is not None
    with log.open("a") as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            seen.append(line)
            if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                print(f"[{prefix}] {line}", end="", flush=True)


def _queue_size(base: str, token: str) -> int:
    req = urllib.request.Request(f"{base}/api/v1/samples?page_size=1", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return int(json.load(r)["total"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--mqtt-port", type=int, default=1883)
    ap.add_argument("--data-dir", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--video", type=Path, default=ROOT / "sample_data" / "line_1080p.mp4")
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long with samples (scripts)")
    args = ap.parse_args(argv)

    http_port, mqtt_port = _port(args.http_port), _port(args.mqtt_port)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    hub_dir = args.data_dir / "hub"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_HUB_ADMIN")}
    hub_cmd = [str(BIN / "lineguard-hub"), "serve", "--data-dir", str(hub_dir), "--http-port", str(http_port),
               "--mqtt-port", str(mqtt_port)]
    agent_cmd = [str(BIN / "lineguard-agent"), "run", "--source", str(args.video), "--loop",
                 "--broker", f"mqtt://127.0.0.1:{mqtt_port}", "--bundle", str(args.bundle),
                 "--station", "demo-plant/line-1/station-1", "--outbox", str(args.data_dir / "agent-outbox.sqlite3"),
                 "--metrics-port", "0"]
    procs: list[subprocess.Popen[str]] = []
    hub_lines: list[str] = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    got_samples = False
    try:
        hub = subprocess.Popen(hub_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
        procs.append(hub)
        threading.Thread(target=_pump, args=(hub, "hub", args.data_dir / "hub.log", hub_lines), daemon=True).start()
        login = None
        deadline = time.monotonic() + 60
        while login is None:
            if stop.is_set() or hub.poll() is not None or time.monotonic() > deadline:
                print("demo: the hub did not start:\n" + "".join(hub_lines[-20:]), file=sys.stderr)
                return 1
            login_file = hub_dir / "demo-login.txt"
            if any(line.startswith("LineGuard hub:") for line in hub_lines) and login_file.exists():
                login = login_file.read_text().strip().split(":", 1)
            time.sleep(0.2)
        token = subprocess.run([str(BIN / "lineguard-hub"), "token", "create", f"demo-{int(time.time())}",
                                "--data-dir", str(hub_dir), "--user", login[0]],
                               capture_output=True, text=True, check=True, env=env).stdout.strip()
        agent = subprocess.Popen(agent_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        procs.insert(0, agent)
        threading.Thread(target=_pump, args=(agent, "agent", args.data_dir / "agent.log", []), daemon=True).start()
        base = f"http://127.0.0.1:{http_port}"
        print(f"demo: hub on {base}/ (MQTT on {mqtt_port}); agent replaying {args.video.name} in a loop; "
              f"logs in {args.data_dir}", flush=True)
        started = time.monotonic()
        while not stop.wait(1.0):
            if any(p.poll() is not None for p in procs):
                print("demo: a process ended unexpectedly; see the logs in " + str(args.data_dir), file=sys.stderr)
                return 1
            n = _queue_size(base, token)
            if n and not got_samples:
                got_samples, started = True, time.monotonic()
                print(f"\ndemo: {n} samples to review at {base}/queue\n"
                      f"demo login: {login[0]} / {login[1]}\n"
                      "Ctrl-C stops the agent and the hub.\n", flush=True)
            if args.seconds is not None and got_samples and time.monotonic() - started >= args.seconds:
                print(f"demo: {n} samples in the queue after {args.seconds:.0f} s; stopping", flush=True)
                break
            if args.seconds is not None and not got_samples and time.monotonic() - started > 120:
                print("demo: no sample reached the hub within 120 s", file=sys.stderr)
                return 1
    finally:
        for p in procs:  # agent first: it drains its outbox to the still-running hub
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        print("demo: stopped", flush=True)
    return 0 if got_samples else 1


if __name__ == "__main__":
    if shutil.which("lineguard-hub", path=str(BIN)) is None:
        sys.exit("demo: run it through `make demo` (the hub and the agent are installed in .venv)")
    raise SystemExit(main())
