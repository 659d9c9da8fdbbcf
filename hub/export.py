"""Export reviewed samples as an Ultralytics YOLO dataset (what retraining consumes).

Layout (``data.yaml`` plus ``images/{train,val}`` and ``labels/{train,val}``)::

    data.yaml            path: ., train: images/train, val: images/val, names: {0: scratch, ...}
    images/train/<sample_id>.jpg
    labels/train/<sample_id>.txt   one "cls cx cy w h" line per box, normalized to the image

- Confirmed samples carry their reviewed boxes; rejected samples are exported with an empty
  label file (reviewed negatives: they teach away false alarms). Unreviewed samples are not
  exported.
- The train/val split is a function of the sample id (SHA-256 of it, ``val_share`` of the hash
  space), so a sample stays on its side across exports. With two or more reviewed samples and
  ``0 < val_share < 1`` neither side is left empty: when every hash falls on one side, the sample
  whose hash lies nearest the other side moves there (training needs validation frames, and the
  gate needs reviewed frames the candidate did not train on). It goes back to its own side once
  another sample falls there naturally.
- ``classes`` fixes the class order (pass the model's class list so ids match its head; classes
  reviewers added are appended after it); by default every known class, sorted.
- :func:`export_dir` writes to a temporary directory and renames it into place; :func:`iter_zip`
  streams a zip file without holding the dataset in memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from hub.blobs import BlobStore
from hub.review import known_classes
from hub.tables import Sample

__all__ = ["ExportStats", "class_order", "export_dir", "iter_entries", "iter_zip"]

BATCH = 500


@dataclass
class ExportStats:
    train: int = 0
    val: int = 0
    boxes: int = 0
    negatives: int = 0


def class_order(s: Session, classes: list[str] | None = None) -> list[str]:
    known = known_classes(s, fresh=True)
    if classes is None:
        return known
    return list(classes) + [c for c in known if c not in classes]


def _hash(sample_id: str) -> float:
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2**64


def _split(sample_id: str, val_share: float, moved: dict[str, str] | None = None) -> str:
    if moved and sample_id in moved:
        return moved[sample_id]
    return "val" if _hash(sample_id) < val_share else "train"


def _moved_sides(s: Session, val_share: float) -> dict[str, str]:
    """``{sample_id: side}`` for the one sample moved so that neither side is empty (see the module doc)."""
    if not 0 < val_share < 1:
        return {}
    ids = s.scalars(select(Sample.sample_id).where(Sample.status.in_(("confirmed", "rejected")))).all()
    if len(ids) < 2:
        return {}
    hashes = [(_hash(i), i) for i in ids]
    lowest, highest = min(hashes), max(hashes)
    if lowest[0] >= val_share:  # all on the training side: the lowest hash validates
        return {lowest[1]: "val"}
    if highest[0] < val_share:  # all on the validation side: the highest hash trains
        return {highest[1]: "train"}
    return {}


def _yaml(names: list[str]) -> bytes:
    lines = ["path: .", "train: images/train", "val: images/val", "names:"]
    lines += [f"  {i}: {n}" for i, n in enumerate(names)]
    return ("\n".join(lines) + "\n").encode()


def iter_entries(s: Session, blobs: BlobStore, names: list[str], val_share: float = 0.2,
                 stats: ExportStats | None = None) -> Iterator[tuple[str, bytes]]:
    """``(relative path, bytes)`` of every file of the dataset, ``data.yaml`` first."""
    stats = stats if stats is not None else ExportStats()
    index = {n: i for i, n in enumerate(names)}
    moved = _moved_sides(s, val_share)
    yield "data.yaml", _yaml(names)
    last = 0
    while True:
        batch = list(s.scalars(
            select(Sample).where(Sample.status.in_(("confirmed", "rejected")), Sample.id > last)
            .options(selectinload(Sample.labels)).order_by(Sample.id).limit(BATCH)))
        if not batch:
            return
        last = batch[-1].id
        for smp in batch:
            split = _split(smp.sample_id, val_share, moved)
            rows = []
            for lb in smp.labels:
                cx, cy = (lb.x1 + lb.x2) / 2 / smp.width, (lb.y1 + lb.y2) / 2 / smp.height
                w, h = (lb.x2 - lb.x1) / smp.width, (lb.y2 - lb.y1) / smp.height
                rows.append(f"{index[lb.cls]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            setattr(stats, split, getattr(stats, split) + 1)
            stats.boxes += len(rows)
            stats.negatives += not rows
            yield f"images/{split}/{smp.sample_id}.jpg", blobs.get(smp.image_sha256)
            yield f"labels/{split}/{smp.sample_id}.txt", ("\n".join(rows) + "\n" if rows else "").encode()


def export_dir(s: Session, blobs: BlobStore, out: Path, classes: list[str] | None = None,
               val_share: float = 0.2) -> ExportStats:
    """Write the dataset to ``out`` (must not exist) atomically; returns what was written."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export into a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    stats = ExportStats()
    try:
        for rel, data in iter_entries(s, blobs, class_order(s, classes), val_share, stats):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


class _Pipe(io.RawIOBase):
    """A write-only sink whose bytes are taken out by the zip streamer after each file."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.chunks.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


def iter_zip(s: Session, blobs: BlobStore, classes: list[str] | None = None, val_share: float = 0.2) -> Iterator[bytes]:
    """The dataset as a zip file, streamed a file at a time (images stored, labels deflated)."""
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w") as zf:
        for rel, data in iter_entries(s, blobs, class_order(s, classes), val_share):
            kind = zipfile.ZIP_STORED if rel.endswith(".jpg") else zipfile.ZIP_DEFLATED
            zf.writestr(rel, data, compress_type=kind)
            yield pipe.take()
    yield pipe.take()
