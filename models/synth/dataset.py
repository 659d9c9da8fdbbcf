"""Write a synthetic YOLO dataset (images, labels, part sidecars, data.yaml, meta.json).

Every image is an independent scene that depends only on ``(seed, split, index)``, so the
result is byte-identical whatever the number of worker processes. The dataset is built in a
temporary sibling directory and renamed into place only when complete.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from models.dataset_io import yolo_label_line
from models.synth.lines import LINES, LineSpec, get_line
from models.synth.scene import render_scene

__all__ = ["GENERATOR_VERSION", "PRESETS", "SPLITS", "DatasetPreset", "generate_dataset", "render_item"]

GENERATOR_VERSION = "1.0.0"
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_IDS = {name: i + 1 for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class DatasetPreset:
    """Image counts per split and the frame size."""

    name: str
    train: int
    val: int
    test: int
    width: int = 1280
    height: int = 720
    empty_prob: float = 0.03

    def count(self, split: str) -> int:
        """Number of images in ``split``."""
        return int(getattr(self, split))


PRESETS: dict[str, DatasetPreset] = {
    "default": DatasetPreset("default", 6000, 600, 900),
    # A new line's first weeks (issue 6): a pool of frames reviewers label (train) and a
    # held-out set the learning-loop benchmark scores before and after retraining (test).
    "field": DatasetPreset("field", 200, 0, 400),
    "small": DatasetPreset("small", 48, 16, 24),
    "tiny": DatasetPreset("tiny", 8, 4, 4),
}


def render_item(seed: int, split: str, index: int, preset: DatasetPreset,
                line: LineSpec = LINES["default"]) -> tuple[bytes, str, dict]:
    """JPEG bytes, YOLO label text and part sidecar of image ``index`` of ``split`` of ``line``."""
    key = [seed, _SPLIT_IDS[split], index] + ([line.seed_tag] if line.seed_tag else [])
    rng = np.random.default_rng(key)
    scene = render_scene(rng, preset.width, preset.height, preset.empty_prob, line)
    ok, buf = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, scene.jpeg_quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    labels = "".join(yolo_label_line(c, b, preset.width, preset.height) + "\n" for c, b in scene.objects)
    return buf.tobytes(), labels, {"parts": scene.parts}


def _write_item(job: tuple[str, int, str, int, DatasetPreset, LineSpec]) -> dict:
    root, seed, split, index, preset, line = job
    image, labels, sidecar = render_item(seed, split, index, preset, line)
    name = f"{index:06d}"
    base = Path(root)
    (base / "images" / split / f"{name}.jpg").write_bytes(image)
    (base / "labels" / split / f"{name}.txt").write_text(labels)
    (base / "parts" / split / f"{name}.json").write_text(json.dumps(sidecar))
    per_class = [0] * len(line.classes)
    for row in labels.splitlines():
        per_class[int(row.split()[0])] += 1
    parts = sidecar["parts"]
    return {
        "split": split,
        "parts": len(parts),
        "good": sum(not p["defective"] for p in parts),
        "empty": int(not parts),
        "defects": per_class,
    }


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _meta(seed: int, preset: DatasetPreset, line: LineSpec, results: list[dict]) -> dict:
    counts = {}
    for split in SPLITS:
        rows = [r for r in results if r["split"] == split]
        per_class = np.sum([r["defects"] for r in rows], axis=0) if rows else [0] * len(line.classes)
        counts[split] = {
            "images": len(rows),
            "empty_images": sum(r["empty"] for r in rows),
            "parts": sum(r["parts"] for r in rows),
            "good_parts": sum(r["good"] for r in rows),
            "defective_parts": sum(r["parts"] - r["good"] for r in rows),
            "defects": {name: int(n) for name, n in zip(line.classes, per_class, strict=False)},
        }
    extra = {} if line == LINES["default"] else {"line": line.name}  # default meta.json unchanged
    return {
        "generator": "models.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "preset": asdict(preset),
        "classes": list(line.classes),
        "products": list(line.products),
        "counts": counts,
        **extra,
    }


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def generate_dataset(
    out_dir: Path,
    seed: int = 0,
    preset: str | DatasetPreset = "default",
    workers: int | None = None,
    progress: bool = True,
    line: str | LineSpec = "default",
) -> Path:
    """Generate a synthetic defect dataset of ``line`` in Ultralytics YOLO layout at ``out_dir``.

    ``workers``: processes to use (None: all CPUs; 1: in this process). Output bytes do not
    depend on it. Returns the resolved ``out_dir``; an existing one is replaced only once the
    new dataset is complete, and a failure leaves no partial dataset behind.
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    spec = get_line(line) if isinstance(line, str) else line
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        for kind in ("images", "labels", "parts"):
            for split in SPLITS:
                (tmp / kind / split).mkdir(parents=True)
        jobs = [(str(tmp), seed, split, i, p, spec) for split in SPLITS for i in range(p.count(split))]
        n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
        bar = tqdm(total=len(jobs), desc=f"synth {p.name}", unit="img", disable=not progress)
        results: list[dict] = []
        try:
            if n_workers == 1:
                threads = cv2.getNumThreads()
                cv2.setNumThreads(1)
                try:
                    for job in jobs:
                        results.append(_write_item(job))
                        bar.update()
                finally:
                    cv2.setNumThreads(threads)
            else:
                # fork: workers need no importable __main__ (works from stdin, notebooks).
                methods = mp.get_all_start_methods()
                ctx = mp.get_context("fork" if "fork" in methods else "spawn")
                with ctx.Pool(n_workers, initializer=_init_worker) as pool:
                    for res in pool.imap(_write_item, jobs, chunksize=4):
                        results.append(res)
                        bar.update()
        finally:
            bar.close()
        data = {
            "path": str(out_dir),
            "train": "images/train",
            "val": "images/val",
            "test": "images/test",
            "nc": len(spec.classes),
            "names": dict(enumerate(spec.classes)),
        }
        (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        (tmp / "meta.json").write_text(json.dumps(_meta(seed, p, spec, results), indent=2) + "\n")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
