"""Simulated agents for bench/rollout.py: :class:`SimAgent` (a real update path: MQTT, bundle
store, updater, swappable detector; a stub, ONNX or split detector), and a fleet of them in this
process (:class:`LocalFleet`) or spread over child processes (:class:`ProcessFleet`, so that N
agents do not share one interpreter lock), behind the same few calls.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle_store import BundleStore
from edge_agent.detector import Detector, DetectorError, OnnxDetector
from edge_agent.mqtt import MqttConfig, MqttTransport
from edge_agent.ota import BundleFetcher, ModelUpdater
from edge_agent.split_detector import SplitDetector
from edge_agent.swap import SwappableDetector
from lineguard_contract import StationId, Topics
from models.bundle import Bundle, load_bundle
from models.detections import Detections
from models.signing import load_public_keys

__all__ = ["ROLES", "LocalFleet", "ProcessFleet", "SimAgent", "StubDetector"]

#: what each agent installs, by mode (as ``edge_agent.agent.Agent.bundle_roles``)
ROLES = {"full": ("onnx_int8",), "split": ("split_edge_int8",)}


class StubDetector(Detector):
    """The bundle's manifest and INT8 file, no inference (2 ms per frame)."""

    def __init__(self, bundle: Bundle) -> None:
        self._configure(bundle, None, None)

    def load(self) -> None:
        if not self.bundle.path("onnx_int8").is_file():
            raise DetectorError(f"{self.bundle.path('onnx_int8')} missing")

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        time.sleep(0.002)
        return [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
                for _ in frames]


class SimAgent:
    def __init__(self, k: int, work: Path, seed: Path, public_key: Path, port: int, token: str, fps: float,
                 detector: str, mode: str, deadline_ms: float = 250.0) -> None:
        self.station = StationId("bench", "line", f"st{k:03d}")
        self.agent_id = f"bench-agent-{k:03d}"
        self.store = BundleStore(work / f"agent{k:03d}", public_keys=load_public_keys([public_key]), roles=ROLES[mode])
        self.store.install(seed)
        self.mqtt = MqttTransport(MqttConfig(client_id=self.agent_id, port=port))
        self.detector, self.mode, self.deadline_ms = detector, mode, deadline_ms
        self.sw = SwappableDetector(self._make(self.store.current(), None))
        self.sw.load()
        self.updater = ModelUpdater(self.store, BundleFetcher(token=token), self._activate, roles=ROLES[mode])
        self.mqtt.subscribe(Topics().station(self.station, "model"), lambda t, p: self.updater.handle(p))
        self.fps, self.frames, self.failed, self.undecided = fps, 0, 0, 0
        self.phase = np.random.default_rng(k).uniform()
        self.replaced: Detector | None = None
        self.at_swap: dict[str, Any] = {}  # the replaced detector's counters when it was replaced
        self.updated_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._frames, daemon=True)

    def _make(self, bundle: Bundle, previous: Detector | None) -> Detector:
        """As the agent's ``_detector_for``: the full model, or the split edge part whose answers
        come from the hub's head service (no local fallback: a missed answer is an undecided frame)."""
        if self.mode == "split":
            return SplitDetector(load_bundle(bundle.dir, roles=("split_edge_int8",)), self.mqtt, self.station,
                                 self.agent_id, mode="split", threads=1, deadline_ms=self.deadline_ms,
                                 previous=previous if isinstance(previous, SplitDetector) else None)
        return OnnxDetector(bundle, workers=1, threads=1) if self.detector == "onnx" else StubDetector(bundle)

    def _activate(self, bundle: Bundle) -> None:
        self.replaced = self.sw.active
        self.at_swap = self.replaced.stats() if self.mode == "split" else {}
        self.sw.swap(self._make(bundle, self.replaced))
        self.updated_at = time.time()  # wall clock: agents may run in other processes

    def late_answers(self) -> int:
        """Answers that came after the agent's deadline, the replaced detector's after the swap included."""
        return self.split_counter("late_results")

    def late_hub_ms(self) -> list[float]:
        """The hub's time (``hub_ms``) in each late answer: near the deadline, the hub was slow;
        small, the answer was late on the way (broker, this agent's process)."""
        if self.mode != "split":
            return []
        dets = {id(d): d for d in (self.sw.active, self.replaced) if d is not None}
        return [ms for d in dets.values() for ms in d.late_hub_ms]

    def split_counter(self, key: str) -> int:
        """A split detector counter over the whole run: the active detector's (a new one takes over
        the replaced one's counters when it loads) plus what the replaced one counted after the swap."""
        if self.mode != "split":
            return 0
        n = self.sw.active.stats().get(key, 0)
        if self.replaced is not None and self.replaced is not self.sw.active:
            n += self.replaced.stats().get(key, 0) - self.at_swap.get(key, 0)
        return int(n)

    def start(self) -> None:
        self.updater.start()
        self.mqtt.start()
        self.thread.start()

    def _frames(self) -> None:
        frame = np.zeros((720, 1280, 3), np.uint8)
        period = 1.0 / self.fps
        # cameras are not in step: each agent's frames start at its own point of the period
        nxt = time.monotonic() + self.phase * period
        self.stop.wait(self.phase * period)
        while not self.stop.is_set():
            try:
                dets = self.sw.detect([frame])
                self.frames += 1
                self.undecided += sum(d.undecided for d in dets)
            except Exception:
                self.failed += 1
            nxt += period
            self.stop.wait(max(0.0, nxt - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.updater.stop()
        self.mqtt.stop()


def _totals(agents: list[SimAgent]) -> dict[str, Any]:
    return {"frames": sum(a.frames for a in agents), "failed": sum(a.failed for a in agents),
            "undecided": sum(a.undecided for a in agents),
            "late": sum(a.late_answers() for a in agents) if agents and agents[0].mode == "split" else None,
            "late_hub_ms": [ms for a in agents for ms in a.late_hub_ms()],
            "messages_sent": sum(a.split_counter("messages_sent") for a in agents),
            "send_failures": sum(a.split_counter("send_failures") for a in agents),
            "updated": sum(a.updated_at is not None for a in agents),
            "update_times": [a.updated_at for a in agents if a.updated_at is not None],
            "refusals": sum(sum(v for k, v in a.updater.counters.items() if k not in ("updated", "already_current"))
                            for a in agents),
            "refusal_errors": sorted({a.updater.last_error for a in agents if a.updater.last_error})}


class LocalFleet:
    """The agents in this process; ``snapshot()`` the running totals, ``close()`` the final ones."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        self.agents = [SimAgent(**spec) for spec in specs]

    def start(self) -> None:
        for a in self.agents:
            a.start()

    def snapshot(self) -> dict[str, Any]:
        return _totals(self.agents)

    def close(self) -> dict[str, Any]:
        for a in self.agents:
            a.close()
        return _totals(self.agents)


def _group_main(specs: list[dict[str, Any]], conn: Connection) -> None:
    fleet = LocalFleet(specs)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "start":
            fleet.start()
            conn.send("started")
        elif cmd == "snapshot":
            conn.send(fleet.snapshot())
        elif cmd == "close":
            conn.send(fleet.close())
            return


class ProcessFleet:
    """The agents spread over ``processes`` child processes (spawned: a fresh interpreter each)."""

    def __init__(self, specs: list[dict[str, Any]], processes: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for i in range(processes):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_group_main, args=(specs[i::processes], theirs), daemon=True)
            p.start()
            self.conns.append(mine)
            self.procs.append(p)
        for c in self.conns:
            if c.recv() != "ready":
                raise RuntimeError("an agent process did not start")

    def _all(self, cmd: str) -> list[Any]:
        for c in self.conns:
            c.send(cmd)
        return [c.recv() for c in self.conns]

    def start(self) -> None:
        self._all("start")

    @staticmethod
    def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in parts:
            for k, v in part.items():
                if v is None:
                    out.setdefault(k, None)
                elif isinstance(v, list):
                    out[k] = sorted({*out.get(k, []), *v}) if k == "refusal_errors" else [*out.get(k, []), *v]
                else:
                    out[k] = (out.get(k) or 0) + v
        return out

    def snapshot(self) -> dict[str, Any]:
        return self._merge(self._all("snapshot"))

    def close(self) -> dict[str, Any]:
        out = self._merge(self._all("close"))
        for p in self.procs:
            p.join(10)
        return out
