"""What the benchmarks share: a broker on 127.0.0.1 for the loopback runs (Mosquitto when installed,
else the embedded one), and printing / writing the result JSON. Imported as ``_common``: a script's
own folder (bench/) is first on sys.path."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(port: int, work: Path) -> tuple[str, Callable[[], None]]:
    """``(name, stop)`` of a broker listening on ``port``: Mosquitto where installed, else the
    embedded one (also with ``LINEGUARD_BENCH_BROKER=embedded``)."""
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe and os.environ.get("LINEGUARD_BENCH_BROKER") != "embedded":
        conf = work / "mosquitto.conf"  # its publish counters every second ($SYS), its notices in a log
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        f"max_queued_messages 10000\nsys_interval 1\nlog_dest file {work / 'mosquitto.log'}\n"
                        "log_type error\nlog_type warning\nlog_type notice\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return "mosquitto", proc.terminate
    from hub.broker import EmbeddedBroker

    b = EmbeddedBroker(host="127.0.0.1", port=port, workdir=work / "broker")
    b.start()
    return "embedded (rumqttd)", b.stop


def mosquitto_counts(port: int, work: Path, timeout: float = 5.0, settle_s: float = 1.2) -> dict[str, Any]:
    """Mosquitto's own publish counters since it started (``$SYS/broker/publish/messages/received``,
    ``sent``, ``dropped``: a message it did not deliver to a subscriber whose queue was full, or to
    an offline one at QoS 0) and how many of its log lines say it dropped messages, with the first
    such line. Waits ``settle_s`` first: the counters are published every second (``sys_interval``)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    time.sleep(settle_s)

    counts: dict[str, Any] = {}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-sys-reader")
    client.on_connect = lambda c, *_: c.subscribe("$SYS/broker/publish/messages/+")
    client.on_message = lambda c, u, msg: counts.__setitem__(msg.topic.rsplit("/", 1)[1], int(msg.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + timeout
    while len(counts) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    log = work / "mosquitto.log"
    dropped = [ln for ln in (log.read_text(errors="replace").splitlines() if log.exists() else []) if "dropp" in ln]
    counts["log_lines_dropped"] = len(dropped)
    counts["first_log_line_dropped"] = dropped[0] if dropped else None
    return counts


def emit_json(result: Any, path: Path | None) -> None:
    """Print ``result`` as indented JSON and, when ``path`` is given, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def cpu_model() -> str:
    """The host CPU's model name and its vector extensions that change torch's and ONNX Runtime's
    speed (the 2-core build machine is not always the same CPU: training speed halved between two
    sessions, docs/benchmarks.md), e.g. ``AMD EPYC (AVX-512, VNNI)``."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first core's lines: model, then flags
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    ext = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("amx_tile", "AMX"))
           if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    return f"{name} ({', '.join(ext)})" if ext else name
