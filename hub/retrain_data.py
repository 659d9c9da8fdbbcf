"""Assembling a retraining dataset: splits copied between YOLO datasets with class ids remapped
by name (the reviewed export and the replay buffer into one training set).

The golden set stays out of it: an image whose bytes are a golden-set image's (whatever its name)
is not copied, so the gate never scores a frame the candidate was trained, or had its operating
threshold picked, on (:func:`image_hashes`, ``copy_split(exclude=...)``).
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Collection
from pathlib import Path

import yaml

from models.dataset_io import IMAGE_SUFFIXES

__all__ = ["copy_split", "dataset_names", "image_hashes", "replay_limits"]


def dataset_names(root: Path) -> list[str]:
    raw = yaml.safe_load((root / "data.yaml").read_text())["names"]
    return list(raw.values()) if isinstance(raw, dict) else list(raw)


def replay_limits(replay_images: int, replay_val_images: int | None = None) -> dict[str, int]:
    """Images drawn from the replay data per split: ``replay_images`` for training, and for
    validation ``replay_val_images`` (default a quarter of ``replay_images``). Validation is where the
    release picks the operating threshold: with 150 replay frames one job in five ships a threshold
    above a 0.3% false-alarm line, with 300 one in eighteen (docs/benchmarks.md, sixteenth session)."""
    if replay_images < 0 or (replay_val_images is not None and replay_val_images < 0):
        raise ValueError(f"replay image counts must be >= 0, got {replay_images}, {replay_val_images}")
    return {"train": replay_images, "val": replay_images // 4 if replay_val_images is None else replay_val_images}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(root: Path, split: str) -> list[Path]:
    return sorted(p for p in (root / "images" / split).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def image_hashes(root: Path, split: str = "val") -> set[str]:
    """SHA-256 of every image of ``root``'s ``split`` (the golden set: its val split)."""
    return {_sha256(p) for p in _images(root, split)}


def copy_split(src: Path, split: str, dst: Path, src_names: list[str], dst_names: list[str], *,
               limit: int | None = None, prefix: str = "", exclude: Collection[str] = ()) -> tuple[int, int]:
    """Images of ``src``'s ``split`` (and their labels, class ids remapped by name) into ``dst``;
    returns (copied, left out). ``limit``: at most that many, a seeded draw; ``exclude``: SHA-256s
    of images never to copy (the draw goes on past them until ``limit`` is reached)."""
    images = _images(src, split)
    if limit is not None and len(images) > limit:  # the draw, then the rest in a seeded order to top it up
        rng = random.Random(0)
        pick = rng.sample(images, limit)
        chosen = set(pick)
        others = [p for p in images if p not in chosen]
        rng.shuffle(others)
        images = pick + others
    taken: list[Path] = []
    left_out = 0
    for img in images:
        if limit is not None and len(taken) >= limit:
            break
        if exclude and _sha256(img) in exclude:
            left_out += 1
        else:
            taken.append(img)
    images = sorted(taken)
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
    return len(images), left_out
