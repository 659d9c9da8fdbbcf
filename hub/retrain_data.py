"""Assembling a retraining dataset: splits copied between YOLO datasets with class ids remapped
by name (the reviewed export and the replay buffer into one training set)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import yaml

__all__ = ["copy_split", "dataset_names"]


def dataset_names(root: Path) -> list[str]:
    raw = yaml.safe_load((root / "data.yaml").read_text())["names"]
    return list(raw.values()) if isinstance(raw, dict) else list(raw)


def copy_split(src: Path, split: str, dst: Path, src_names: list[str], dst_names: list[str], *,
                limit: int | None = None, prefix: str = "") -> int:
    """Images of ``src``'s ``split`` (and their labels, class ids remapped by name) into ``dst``."""
    images = sorted(p for p in (src / "images" / split).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if limit is not None and len(images) > limit:
        images = sorted(random.Random(0).sample(images, limit))
    remap = {i: dst_names.index(n) for i, n in enumerate(src_names)}
    (dst / "images" / split).mkdir(parents=True, exist_ok=True)
    (dst / "labels" / split).mkdir(parents=True, exist_ok=True)
    for img in images:
        shutil.copyfile(img, dst / "images" / split / f"{prefix}{img.name}")
        lab = src / "labels" / split / f"{img.stem}.txt"
        lines = []
        if lab.exists():
            for line in lab.read_text().splitlines():
                if line.strip():
                    c, *rest = line.split()
                    lines.append(" ".join([str(remap[int(c)]), *rest]))
        (dst / "labels" / split / f"{prefix}{img.stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        parts = src / "parts" / split / f"{img.stem}.json"
        if parts.exists():
            (dst / "parts" / split).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(parts, dst / "parts" / split / f"{prefix}{img.stem}.json")
    return len(images)
