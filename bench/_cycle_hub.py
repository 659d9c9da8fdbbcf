"""The hub side of a learning-cycle run (bench/learning_cycle.py): a hub with the production
bundle registered, the line's agent as the hub hears of it (samples and a heartbeat through the
real ingest pipeline), and QA staff reviewing the samples with the synthetic ground truth.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hub.gate_scoring import operating_conf
from models.bundle import Bundle
from models.dataset_io import YoloDataset
from models.onnx_predict import OnnxPredictor

__all__ = ["build_hub", "report_fleet", "review_samples", "send_samples"]


def build_hub(work: Path, production: Path) -> tuple[Any, Any]:
    from hub.blobs import FileBlobStore
    from hub.core.db import make_engine, make_session_factory, upgrade
    from hub.registry import register

    engine = make_engine(f"sqlite:///{work / 'hub.db'}")
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        register(s, production, actor="bench", status="production")
    return sessions, FileBlobStore(work / "blobs", fsync=False)


def report_fleet(sessions: Any, blobs: Any, line: str, version: str, mode: str) -> None:
    """The line's agent as the hub hears of it: one heartbeat through the ingest pipeline, in
    ``mode`` (what ``retrain.split_parts: auto`` decides on)."""
    from hub.pipeline import IngestPipeline
    from lineguard_contract import HeartbeatPayload, StationId, Topics, encode

    hb = HeartbeatPayload(agent_id="bench-agent", ts=time.time(), model_version=version, uptime_s=60.0, fps=30.0,
                          dropped_frames=0, batch_size=1, latency_p50_ms=20.0, latency_p99_ms=40.0, outbox_depth=0,
                          outbox_bytes=0, evicted=0, mode=mode)  # type: ignore[arg-type]
    IngestPipeline(sessions, blobs).handle(Topics().station(StationId("plant2", line, "s1"), "heartbeat"), encode(hb))


def send_samples(sessions: Any, blobs: Any, field: YoloDataset, n: int, prod: Bundle, line: str) -> list[str]:
    """The first ``n`` train frames as an agent's samples through the real ingest pipeline."""
    from hub.pipeline import IngestPipeline
    from lineguard_contract import Detection, SamplePayload, Topics, encode

    pipeline, topics = IngestPipeline(sessions, blobs), Topics()
    predict = OnnxPredictor(prod.path("onnx_int8"))
    conf, names = operating_conf(prod), list(prod.manifest.classes)
    ids = []
    for i, smp in enumerate(tqdm(field.split("train")[:n], desc="samples", unit="frame")):
        frame = smp.read()
        det = predict([frame], conf=conf)[0]
        dets = [Detection(cls=names[int(c)], score=float(sc), box=[float(v) for v in b])
                for b, sc, c in zip(det.boxes, det.scores, det.class_ids, strict=True)]
        sid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"lineguard-bench/{line}/{smp.image_path.name}"))
        p = SamplePayload(sample_id=sid, site="plant2", line=line, station="s1", camera="cam0",
                          capture_ts=1767225600.0 + i, model_version=prod.manifest.version,
                          reason="defect" if dets else "random_negative", width=frame.shape[1],
                          height=frame.shape[0], image=smp.image_path.read_bytes(), detections=dets)
        pipeline.handle(topics.station(p.station_id, "samples"), encode(p))
        ids.append(sid)
    return ids


def review_samples(sessions: Any, field: YoloDataset, ids: list[str]) -> dict[str, int]:
    """Confirm every frame with its true boxes (the reviewer adds unknown classes) or reject it."""
    from hub.accounts import create_user
    from hub.review import Box, add_class, apply_review, get_sample, known_classes
    from hub.tables import User

    counts = {"confirmed": 0, "rejected": 0, "boxes": 0}
    with sessions.begin() as s:
        create_user(s, "qa", "bench-password-1", "reviewer")
        uid = s.query(User).filter_by(username="qa").one().id
        for name in field.names:
            if name not in known_classes(s, fresh=True):
                add_class(s, name, by="qa")
        for smp, sid in zip(field.split("train"), ids, strict=False):
            sample = get_sample(s, sid)
            assert sample is not None, sid
            w, h = float(sample.width), float(sample.height)  # the UI clips to the frame; so do labels here
            boxes = [Box(field.names[int(c)], max(0.0, float(x1)), max(0.0, float(y1)), min(w, float(x2)),
                         min(h, float(y2))) for c, x1, y1, x2, y2 in smp.labels]
            if boxes:
                apply_review(s, sample, user_id=uid, username="qa", action="confirm", boxes=boxes)
                counts["confirmed"] += 1
                counts["boxes"] += len(boxes)
            else:
                apply_review(s, sample, user_id=uid, username="qa", action="reject")
                counts["rejected"] += 1
    return counts
