"""The hub's embedded MQTT broker: rumqttd 0.20 (via the ``iotcore`` wheel) in a child process.

``lineguard-hub serve`` uses it when no broker is configured (the demo default), so the demo needs only
PyPI packages. :class:`EmbeddedBroker` writes a rumqttd TOML config (one plain MQTT 3.1.1 listener) and
runs ``python -m hub.broker CONFIG``, which binds the port before it reports ready: ``start()`` raises
RuntimeError naming a taken port; ``stop()`` frees the port; a broker crash cannot take the hub down
(``running`` turns False); the child exits when its stdin, a pipe from the hub, closes, so it never
outlives the hub. rumqttd has no shutdown API, hence no in-process mode.

Limits, so that nobody mistakes it for a production broker:

* No persistence: sessions, queued QoS 1 messages and retained messages live in memory only.
* A persistent session's offline queue is the router's in-memory commit log per subscription filter,
  ``ROUTER_SEGMENT_BYTES * ROUTER_SEGMENT_COUNT``; a subscriber further behind misses the oldest messages.
* rumqttd's router thread panics ("group must exists") when a persistent session alone in a ``$share``
  group goes away with unacknowledged QoS 1 messages. The process would live on serving nobody, so the
  child watches its threads and exits with code 70: ``running`` turns False and all state is lost.
* No TLS, no authentication (anonymous), no ACLs: keep it on 127.0.0.1 unless the network is trusted.
* rumqttd refuses empty client ids and a keep-alive of 0, drops the connection on a packet over
  ``MAX_PACKET_BYTES``, and delivers at the subscription's QoS even when the publish had a lower one.
* rumqttd's log records are dropped unless ``LINEGUARD_BROKER_DEBUG=1`` (its tracing spans surface as
  ERROR records for every packet); panics still reach ``broker.log`` in the work directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lineguard_contract import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

#: Largest MQTT packet (rumqttd's ``max_payload_size`` bounds the whole packet; default 20 KiB): the
#: contract's largest payload plus room for the fixed header, topic and packet id.
MAX_PACKET_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024
MAX_INFLIGHT = 100  # rumqttd's per-connection setting; its router's outgoing QoS 1 window is a fixed 100
MAX_OUTGOING_PACKETS = 200  # publishes the router hands a connection per read of its commit log
ROUTER_SEGMENT_BYTES, ROUTER_SEGMENT_COUNT = 16 * 1024 * 1024, 8  # commit log kept per subscription filter

_READY, _SERVER = b"lineguard-broker-ready\n", "lineguard-v4"  # _SERVER also names rumqttd's listener thread
_ANY = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # where to connect to check a wildcard listener
_REPO_ROOT = Path(__file__).resolve().parents[1]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_config(host: str, port: int) -> str:
    """The rumqttd TOML for one plain MQTT 3.1.1 listener on ``host:port`` with LineGuard's limits."""
    return f"""\
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = {MAX_OUTGOING_PACKETS}
max_segment_size = {ROUTER_SEGMENT_BYTES}
max_segment_count = {ROUTER_SEGMENT_COUNT}
[v4.1]
name = "{_SERVER}"
listen = "{_hostport(host, port)}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {MAX_PACKET_BYTES}
max_inflight_count = {MAX_INFLIGHT}
dynamic_filters = true
"""


class EmbeddedBroker:
    """An anonymous MQTT 3.1.1 broker on ``host:port`` in a child process (see the module docstring).
    ``workdir`` gets ``rumqttd.toml`` and ``broker.log`` and is kept; by default a temporary one is used."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, workdir: Path | None = None) -> None:
        self.host, self.port, self.workdir = host, port, workdir
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{_hostport(self.host, self.port)}"

    @property
    def running(self) -> bool:
        """True while the broker process is alive (False before start, after stop, or after a crash)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker process id while started (it may have died since; see ``running``)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        directory = self.workdir or (Path(self._tmp.name) if self._tmp else None)
        return directory / "broker.log" if directory else None

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker; return once ``port`` accepts TCP connections, else raise RuntimeError."""
        if self.running:
            return
        self._release(quiet=False)  # a crashed earlier run: say so, clean up
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lineguard-broker-")
        directory = self.workdir or Path(self._tmp.name if self._tmp else ".")
        directory.mkdir(parents=True, exist_ok=True)
        (config := directory / "rumqttd.toml").write_text(render_config(self.host, self.port))
        path = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        with (directory / "broker.log").open("ab") as log_file:  # PYTHONPATH: hub.broker from this checkout
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "hub.broker", str(config)], cwd=directory,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env={**os.environ, "PYTHONPATH": path},
                start_new_session=True,  # Ctrl+C reaches the hub only; the hub decides when the broker stops
            )
        try:
            self._wait_ready(time.monotonic() + timeout, timeout)
        except BaseException:
            self._release(quiet=True)
            raise
        log.info("embedded MQTT broker listening on %s (pid %d, packets up to %d bytes, log %s)",
                 self.url, self._proc.pid, MAX_PACKET_BYTES, self.log_path)

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        proc, out = self._proc, b""
        assert proc is not None and proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while _READY not in out:
                if (remaining := deadline - time.monotonic()) <= 0:
                    raise RuntimeError(f"embedded MQTT broker did not listen on {self.host}:{self.port} "
                                       f"within {timeout} s{self._log_tail()}")
                if sel.select(remaining):
                    if not (chunk := os.read(proc.stdout.fileno(), 4096)):  # exited: port taken, bad config...
                        raise RuntimeError(f"embedded MQTT broker could not listen on {self.host}:{self.port} "
                                           f"(exit code {proc.wait(5)}){self._log_tail()}")
                    out += chunk
        proc.stdout.close()
        while True:  # the child has bound the port; confirm that it accepts connections
            try:
                with socket.create_connection((_ANY.get(self.host, self.host), self.port), timeout=0.5):
                    return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"embedded MQTT broker on port {self.port} refuses connections: {exc}"
                                       f"{self._log_tail()}") from exc
                time.sleep(0.02)

    def _log_tail(self, lines: int = 15) -> str:
        path = self.log_path
        tail = path.read_text(errors="replace").splitlines()[-lines:] if path and path.exists() else []
        return ":\n" + "\n".join(tail) if tail else ""

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker and free its port; safe to call twice or without start()."""
        self._release(quiet=False, timeout=timeout)

    def _release(self, quiet: bool, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is not None and not quiet:  # it crashed or was killed
            log.warning("embedded MQTT broker had exited with code %s%s", proc.returncode, self._log_tail())
        elif proc is not None and proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()  # the child exits when its stdin closes
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded MQTT broker (pid %d) ignored stdin EOF; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout)
            (log.debug if quiet else log.info)("embedded MQTT broker on %s stopped", self.url)
        for stream in filter(None, (proc.stdin, proc.stdout) if proc is not None else ()):
            stream.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _thread_names() -> set[str]:  # Linux; empty elsewhere
    names, tasks = set(), Path("/proc/self/task")
    for task in tasks.iterdir() if tasks.is_dir() else ():
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            names.add((task / "comm").read_text().strip())
    return names


def _watchdog(watched: set[str]) -> None:
    """rumqttd outlives a panic of its router or listener thread but then serves nobody: exit instead."""
    while not (dead := watched - _thread_names()):
        time.sleep(0.2)
    logging.getLogger("hub.broker.child").critical("rumqttd thread %s died (see the panic above); exiting",
                                                   ", ".join(sorted(dead)))
    logging.shutdown()
    os._exit(70)


def _serve(argv: list[str] | None = None) -> int:
    """The child process: bind, say ready on stdout, serve until stdin closes."""
    (config,) = sys.argv[1:] if argv is None else argv  # the rumqttd TOML written by EmbeddedBroker.start()
    child_log = logging.getLogger("hub.broker.child")
    debug = os.environ.get("LINEGUARD_BROKER_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("rumqttd", "tracing"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.CRITICAL + 1)
    try:
        import iotcore
        from iotcore import IotCoreBroker

        broker = IotCoreBroker(config_path=config)
        broker.start()  # binds synchronously (OSError when taken), then serves from rumqttd's threads
    except (ImportError, OSError, ValueError) as exc:
        child_log.error("cannot start the broker: %s", exc)
        return 2
    child_log.info("iotcore %s (rumqttd) listening on %s", iotcore.__version__, ", ".join(broker.listeners()))
    deadline, watched = time.monotonic() + 5, {"router-0", _SERVER}  # rumqttd starts them in the background
    while (missing := watched - _thread_names()) and time.monotonic() < deadline:
        time.sleep(0.01)
    if missing:
        child_log.warning("no rumqttd thread named %s here: a panic in rumqttd will go unnoticed", missing)
    else:  # watched from before READY on, so that no panic can slip between two looks
        threading.Thread(target=_watchdog, args=(watched,), daemon=True).start()
    os.write(sys.stdout.fileno(), _READY)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything printed later goes to the log
    sys.stdin.buffer.read()  # until the hub closes the pipe (stop()) or exits
    child_log.info("stdin closed; exiting")
    logging.shutdown()
    os._exit(0)  # skip interpreter teardown while rumqttd's threads still run


if __name__ == "__main__":
    sys.exit(_serve())
