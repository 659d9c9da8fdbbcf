"""``lineguard-agent``: the edge agent's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("lineguard.agent")

def _default_bundle() -> Path:
    import models

    return Path(models.__file__).resolve().parent / "default"


DEFAULT_BUNDLE = _default_bundle()


def _replay(args: argparse.Namespace) -> int:
    from edge_agent.detector import DetectorError, OnnxDetector
    from edge_agent.golden import Tolerance, compare_results, read_results
    from edge_agent.replay import replay
    from edge_agent.sources import SourceError
    from models.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle, roles=(args.model,))
        detector = OnnxDetector(bundle, role=args.model, conf=args.conf, threads=args.threads)
        detector.load()
        report = replay(args.video, detector, args.out, annotated=args.video_out, batch=args.batch,
                        progress=not args.quiet)
    except (BundleError, DetectorError, SourceError, OSError) as exc:
        print(f"lineguard-agent replay: error: {exc}", file=sys.stderr)
        return 2
    print(f"results:   {report.results}  ({report.frames} frames, {report.detections} detections, "
          f"{report.frames_with_detections} frames with defects)", file=sys.stderr)
    if report.annotated:
        print(f"annotated: {report.annotated}", file=sys.stderr)
    print(f"speed:     {report.fps} fps end to end, {report.sessions} model session(s) "
          f"({report.provider}, model v{report.model_version})", file=sys.stderr)
    if args.expect is not None:
        try:
            golden = read_results(args.expect)
        except (OSError, ValueError) as exc:
            print(f"lineguard-agent replay: error: golden file: {exc}", file=sys.stderr)
            return 2
        tol = Tolerance(iou=args.iou_tol, score=args.score_tol, conf=detector.conf)
        diff = compare_results(read_results(args.out), golden, tol)
        print(f"golden:    {diff.summary()}", file=sys.stderr)
        if not diff.ok:
            return 1
    print(json.dumps(report.to_dict()))
    return 0


def _run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from edge_agent.agent import Agent
    from edge_agent.config import ConfigError, load_config
    from edge_agent.detector import DetectorError
    from edge_agent.outbox import OutboxError
    from edge_agent.sources import SourceError
    from models.bundle import BundleError

    overrides: dict[str, object] = {}
    if args.source:
        overrides["cameras"] = [{"id": f"cam{i + 1}", "source": s, "loop": args.loop}
                                for i, s in enumerate(args.source)]
    if args.broker:
        overrides["mqtt.url"] = args.broker
    if args.bundle:
        overrides["model.bundle"] = str(args.bundle)
    if args.station:
        parts = args.station.split("/")
        if len(parts) != 3:
            print("lineguard-agent run: error: --station must be SITE/LINE/STATION", file=sys.stderr)
            return 2
        overrides.update({"identity.site": parts[0], "identity.line": parts[1], "identity.station": parts[2]})
    if args.outbox:
        overrides["outbox.path"] = str(args.outbox)
    if args.metrics_port is not None:
        overrides["metrics.port"] = args.metrics_port
    if args.config is None and "model.bundle" not in overrides:
        overrides["model.bundle"] = str(DEFAULT_BUNDLE)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"lineguard-agent run: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else cfg.log_level)
    try:
        agent = Agent(cfg)
        agent.start()
    except (ConfigError, BundleError, DetectorError, SourceError, OutboxError, OSError, ValueError) as exc:
        print(f"lineguard-agent run: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if agent.finished():
            log.info("every source has ended")
            break
    agent.stop(drain_s=args.drain)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lineguard-agent", description="LineGuard edge agent")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("replay", help="run a recorded video through a model bundle")
    r.add_argument("video", type=Path)
    r.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="model bundle directory")
    r.add_argument("--out", type=Path, required=True, help="results.jsonl to write")
    r.add_argument("--video", dest="video_out", type=Path, default=None, help="annotated MP4 to write")
    r.add_argument("--expect", type=Path, default=None, help="golden results.jsonl; exit 1 on differences")
    r.add_argument("--model", default="onnx_int8", choices=["onnx_int8", "onnx_fp32"])
    r.add_argument("--conf", type=float, default=None, help="confidence threshold (default: the bundle's)")
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    r.add_argument("--iou-tol", type=float, default=0.85)
    r.add_argument("--score-tol", type=float, default=0.05)
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_replay)

    g = sub.add_parser("run", help="run the agent: cameras -> model -> samples over MQTT")
    g.add_argument("-c", "--config", type=Path, default=None, help="station YAML (deploy/agent/station.yaml)")
    g.add_argument("--source", action="append", help="camera source (repeatable); replaces the file's cameras")
    g.add_argument("--loop", action="store_true", help="loop --source video files")
    g.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    g.add_argument("--bundle", type=Path, help="model bundle directory")
    g.add_argument("--station", help="SITE/LINE/STATION")
    g.add_argument("--outbox", type=Path, help="outbox SQLite file")
    g.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (0: off)")
    g.add_argument("--drain", type=float, default=5.0, help="seconds to keep delivering after a stop")
    g.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
