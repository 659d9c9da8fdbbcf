"""A rollout to N simulated agents on loopback: time until every agent runs the new version, and
frames dropped during the swaps (issue 6 target: 50 agents in <= 60 s, zero frames dropped).

One process holds: a broker (Mosquitto, else the embedded one), the hub's API (uvicorn on
127.0.0.1, a SQLite registry with the production and the new version, both signed), and N agents.
Each agent is what ``edge_agent`` runs for an update, for real: its own MQTT client subscribed
to its station's retained ``model`` topic, a :class:`~edge_agent.ota.ModelUpdater` that fetches
the bundle from the hub over HTTP with a bearer token, checks the manifest hash, the Ed25519
signature and every file hash, installs into its own :class:`~edge_agent.bundle_store.BundleStore`
(fsync, atomic links) and swaps a :class:`~edge_agent.swap.SwappableDetector` between frames;
and a frame loop at ``--fps`` through that detector, counting frames that fail. Inference itself
is a stub (``--detector stub``: 2 ms per frame; ONNX Runtime for 50 agents does not fit on 2
cores): this measures delivery and swap, not the model. ``--detector onnx`` runs the real INT8
model per agent (a larger machine). ``--mode split``: each agent runs the bundle's INT8 edge part
in a :class:`~edge_agent.split_detector.SplitDetector` (its store and updates hold the edge part
only) and the hub's head service (in this process, or its own with ``--heads-process``) starts
with 1.0.0's head and loads 1.1.0's when first asked; a frame the hub does not answer within the
agent's ``--deadline-ms`` is undecided (split mode's dropped frame), counted before and during the
rollout.

    python bench/rollout.py --agents 50 --json docs/results/rollout_50.json
    python bench/rollout.py --agents 10 --fps 1 --mode split --deadline-ms 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from _common import cpu_model, emit_json, free_port, mosquitto_counts, start_broker  # noqa: E402
from _rollout_agents import ROLES, LocalFleet, ProcessFleet  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.bundle import load_bundle  # noqa: E402
from models.signing import generate_keypair, rebadge_bundle  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--fps", type=float, default=10.0, help="frames per second per agent")
    ap.add_argument("--detector", choices=["stub", "onnx"], default="stub", help="full mode's inference")
    ap.add_argument("--mode", choices=["full", "split"], default="full",
                    help="split: agents run the bundle's INT8 edge part, the hub's head service (in this process, "
                         "started with 1.0.0 only) answers and loads 1.1.0's head when first asked")
    ap.add_argument("--heads-runtime", choices=["onnx", "torch"], default="onnx",
                    help="split mode: the head service's runtime (torch: FP16 on the GPU, as a GPU hub runs it)")
    ap.add_argument("--heads-device", default=None, help="the torch head's device (heads.device; default cuda)")
    ap.add_argument("--heads-threads", type=int, default=None,
                    help="split mode: the head service's ONNX Runtime threads (default: ONNX Runtime's, one per core)")
    ap.add_argument("--heads-process", action="store_true",
                    help="split mode: the head service in its own process (as a hub runs it), not this one")
    ap.add_argument("--deadline-ms", type=float, default=250.0,
                    help="split mode: how long an agent waits for the hub's answer (the agent config's default)")
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--agent-processes", type=int, default=1,
                    help="spread the agents over this many processes (1: all in this one)")
    ap.add_argument("--settle-s", type=float, default=2.0,
                    help="seconds the fleet runs on 1.0.0 before the announcement; the last 2 are counted as 'before'")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import uvicorn

    from hub.accounts import create_token, create_user
    from hub.api import HubContext, create_app
    from hub.blobs import FileBlobStore
    from hub.core.config import build_config
    from hub.core.db import make_engine, make_session_factory, upgrade
    from hub.heads import HEAD_ROLES
    from hub.mqtt import RetainedPublisher
    from hub.registry import register
    from hub.rollout import promote
    from hub.server import start_heads
    from hub.tables import Station

    work = Path(tempfile.mkdtemp(prefix="lg_rollout_"))
    priv, pub = generate_keypair(work / "keys")
    roles: tuple[str, ...] = ("onnx_int8",)
    if args.mode == "split":  # the agents' edge part and what the hub's head runtime reads
        roles = ("onnx_int8", "split_edge_int8", *HEAD_ROLES[args.heads_runtime])
    old = rebadge_bundle(args.bundle, work / "bundles" / "1.0.0", "1.0.0", priv, roles=roles)
    new = rebadge_bundle(args.bundle, work / "bundles" / "1.1.0", "1.1.0", priv, roles=roles)
    port = free_port()
    broker_name, stop_broker = start_broker(port, work)
    hub_cfg: dict[str, Any] = {"data_dir": str(work / "hub"), "mqtt": {"url": f"mqtt://127.0.0.1:{port}"}}
    if args.mode == "split":
        hub_cfg["heads"] = {"bundles": [str(old)], "bundles_dir": str(work / "bundles"), "max_delay_ms": 2,
                            "runtime": args.heads_runtime, "threads": args.heads_threads}
        if args.heads_device:
            hub_cfg["heads"]["device"] = args.heads_device
    config = build_config(hub_cfg)
    heads: Any = None
    head_ready_s = None
    if args.mode == "split" and args.heads_process:  # as on a hub: `lineguard-hub heads`, its own interpreter
        import subprocess

        import yaml

        (work / "hub.yaml").write_text(yaml.safe_dump(hub_cfg))
        heads_log = (work / "heads.log").open("w")  # its warnings (slow answers) go into the result
        with (work / "heads.out").open("w") as heads_out:
            heads = subprocess.Popen([sys.executable, "-m", "hub.cli", "heads", "-c", str(work / "hub.yaml")],
                                     stdout=heads_out, stderr=heads_log, text=True)
        head_ready_s = _wait_running(heads, work / "heads.out", work / "heads.log")
        print(f"head service process ready in {head_ready_s:.1f} s", file=sys.stderr)
    elif args.mode == "split":
        heads = start_heads(config, client_id="bench-heads")
    engine = make_engine(config.db_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        register(s, old, actor="bench", status="production")
        register(s, new, actor="bench")
        create_user(s, "fleet", "bench-password-1", "viewer")
        token = create_token(s, "fleet", "agents")
        for k in range(args.agents):
            s.add(Station(site="bench", line="line", station=f"st{k:03d}", created_at=datetime.now(UTC)))
    http_port = free_port()
    app = create_app(HubContext(config, make_session_factory(engine, immediate=True), FileBlobStore(config.blob_dir),
                                read_sessions=make_session_factory(engine)))  # as hub.server.serve
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning",
                                           lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    specs = [{"k": k, "work": work / "agents", "seed": old, "public_key": pub, "port": port, "token": token,
              "fps": args.fps, "detector": args.detector, "mode": args.mode, "deadline_ms": args.deadline_ms}
             for k in range(args.agents)]
    fleet = ProcessFleet(specs, args.agent_processes) if args.agent_processes > 1 else LocalFleet(specs)
    fleet.start()
    time.sleep(max(0.0, args.settle_s - 2.0))  # frames on 1.0.0 before the counted window
    start = fleet.snapshot()
    time.sleep(min(2.0, args.settle_s))  # the counted window: every agent connected and running frames on 1.0.0
    before = fleet.snapshot()
    t0, t0_wall = time.monotonic(), time.time()
    with sessions.begin() as s, RetainedPublisher(config.mqtt, "bench-rollout") as pub_mqtt:
        n = promote(s, pub_mqtt.publish, "1.1.0", public_url=f"http://127.0.0.1:{http_port}", actor="bench",
                    reason="bench")
    t_announced = time.monotonic() - t0
    bar = tqdm(total=args.agents, desc="updated")
    while True:
        done = fleet.snapshot()["updated"]
        bar.n = done
        bar.refresh()
        if done == args.agents or time.monotonic() - t0 > args.timeout:
            break
        time.sleep(0.1)
    bar.close()
    elapsed = time.monotonic() - t0
    time.sleep(1.0)  # frames keep flowing on the new version
    after = fleet.close()
    head_stats = heads.service.stats() if heads is not None and not args.heads_process else None
    if args.heads_process and heads is not None:
        heads.terminate()
        heads.wait(10)
        heads_log.close()
        head_stats = _final_counts(work / "heads.log")
    elif heads is not None:
        heads.stop()
    server.should_exit = True
    broker_counts = mosquitto_counts(port, work) if broker_name == "mosquitto" else None
    stop_broker()
    times = sorted(t - t0_wall for t in after["update_times"])
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "broker": broker_name, "broker_publish_counts": broker_counts,
        "agents": args.agents, "agent_processes": args.agent_processes, "mode": args.mode,
        "detector": "split edge INT8 + hub head service" if args.mode == "split" else args.detector,
        "head_service_process": ("own" if args.heads_process else "bench's") if args.mode == "split" else None,
        "head_runtime": args.heads_runtime if args.mode == "split" else None,
        "head_threads": args.heads_threads if args.mode == "split" else None,
        "head_device": args.heads_device if args.mode == "split" else None,
        "head_service_ready_s": None if head_ready_s is None else round(head_ready_s, 1),
        "fps_per_agent": args.fps, "deadline_ms": args.deadline_ms if args.mode == "split" else None,
        "bundle_bytes_per_agent": sum(new.joinpath(load_bundle(new, roles=(r,)).path(r).name).stat().st_size
                                      for r in ROLES[args.mode]),
        "stations_announced": n, "announce_s": round(t_announced, 2),
        "all_updated": len(times) == args.agents, "rollout_s": round(elapsed, 2),
        "update_s_p50": round(float(np.percentile(times, 50)), 2) if times else None,
        "update_s_max": round(times[-1], 2) if times else None,
        "frames_during": after["frames"] - before["frames"],
        "frames_failed": after["failed"],
        "settle_s": args.settle_s,
        "frames_undecided_before": before["undecided"] - start["undecided"],  # the 2 s before the announcement
        "frames_undecided_settling": start["undecided"],  # earlier, while the fleet settled
        "frames_undecided_during": after["undecided"] - before["undecided"],
        "late_answers": after["late"],
        "late_answers_hub_ms": _spread(after["late_hub_ms"]),
        "feature_messages_sent": after["messages_sent"] if args.mode == "split" else None,
        "send_failures": after["send_failures"] if args.mode == "split" else None,
        "head_service": head_stats,
        "head_service_warnings": _warnings(work / "heads.log") if args.heads_process else None,
        "refusals": after["refusals"],
        "refusal_errors": after["refusal_errors"][:5],
    }
    emit_json(result, args.json)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if result["all_updated"] and result["frames_failed"] == result["frames_undecided_during"] == 0 else 1


def _wait_running(proc: Any, out: Path, log: Path, timeout: float = 600.0) -> float:
    """Seconds until the head process prints that it runs (after its heads are loaded and it is
    subscribed); whatever it prints before (Ultralytics' first-run settings notice on a new machine)
    is not that line. Exits with its log's tail when the process ends first or takes too long."""
    t0 = time.monotonic()
    while "head service running" not in out.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise SystemExit(f"the head process did not start (exit {proc.poll()}):\n{tail}")
        time.sleep(0.05)
    return time.monotonic() - t0


def _final_counts(log: Path) -> dict[str, Any] | None:
    """The head process's counters, from the line it logs when it stops (hub/mqtt.py)."""
    marker = "head service stopped; counts "
    lines = [line for line in log.read_text(errors="replace").splitlines() if marker in line]
    return json.loads(lines[-1].split(marker, 1)[1]) if lines else None


def _warnings(log: Path) -> list[str]:
    """The head process's warnings and errors (slow answers, disconnects), the last 20."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [line for line in lines if " WARNING " in line or " ERROR " in line][-20:]


def _spread(values: list[float]) -> dict[str, float] | None:
    """p50 / max / count of the late answers' hub time (None without any)."""
    if not values:
        return None
    return {"count": len(values), "p50": round(float(np.median(values)), 1), "max": round(max(values), 1)}


if __name__ == "__main__":
    raise SystemExit(main())
