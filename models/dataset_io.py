"""Read Ultralytics-layout YOLO datasets (plus LineGuard's per-image ``parts`` sidecar) into numpy.

Layout::

    DIR/data.yaml                 path, train/val/test (image dirs or .txt lists), names
    DIR/images/{split}/*.jpg
    DIR/labels/{split}/<stem>.txt  "cls cx cy w h" normalised; empty or missing file = no objects
    DIR/parts/{split}/<stem>.json  {"parts": [{"box": [x1, y1, x2, y2], "product", "defective", "visible"}]}

Labels and parts are found like Ultralytics finds labels: the last ``/images/`` path component of
an image path is replaced by ``/labels/`` (or ``/parts/``) and the suffix by ``.txt`` (``.json``).
Labels come back as ``(N, 5)`` float32 ``[cls, x1, y1, x2, y2]`` in pixels of the original image.
Imports numpy, OpenCV and PyYAML only.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetError",
    "Part",
    "Sample",
    "YoloDataset",
    "image_size",
    "load_dataset",
    "read_label_file",
    "read_parts_file",
    "yolo_label_line",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")
COORD_TOL = 1e-3


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Part:
    """One physical part in a frame (from the ``parts`` sidecar)."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 pixels
    product: str
    defective: bool
    visible: float = 1.0


@dataclass(frozen=True)
class Sample:
    """One image of a split with its ground truth.

    ``labels`` is ``(N, 5)`` float32 ``[cls, x1, y1, x2, y2]`` in pixels; ``parts`` is ``None``
    when the image has no sidecar. ``width``/``height`` are the image size in pixels.
    """

    image_path: Path
    labels: np.ndarray
    parts: list[Part] | None = None
    width: int = 0
    height: int = 0

    def read(self) -> np.ndarray:
        """Decode the image (BGR uint8)."""
        img = cv2.imread(str(self.image_path), cv2.IMREAD_COLOR)
        if img is None:
            raise DatasetError(f"{self.image_path}: cannot decode image")
        return img


@dataclass
class YoloDataset:
    root: Path
    names: list[str]
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    yaml_path: Path | None = None

    @property
    def nc(self) -> int:
        return len(self.names)

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            raise DatasetError(
                f"{self.yaml_path or self.root}: unknown split {name!r} (available: {sorted(self.splits)})"
            )
        return self.splits[name]

    def __getitem__(self, name: str) -> list[Sample]:
        return self.split(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.splits)


# ------------------------------------------------------------------------------------------
# Image size from the file header (no full decode) for JPEG and PNG; cv2 fallback otherwise.
# ------------------------------------------------------------------------------------------

_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(f: Any) -> tuple[int, int] | None:
    f.seek(2)
    while True:
        b = f.read(1)
        while b and b != b"\xff":
            b = f.read(1)
        while b == b"\xff":
            b = f.read(1)
        if not b:
            return None
        marker = b[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        seg = f.read(2)
        if len(seg) < 2:
            return None
        (length,) = struct.unpack(">H", seg)
        if marker == 0xE1:  # APP1/EXIF: an orientation tag would make cv2 rotate; let cv2 decide
            head = f.read(min(length - 2, 64 * 1024))
            if head.startswith(b"Exif\x00\x00") and _exif_rotates(head[6:]):
                return None
            continue
        if marker in _SOF_MARKERS:
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return w, h
        f.seek(length - 2, os.SEEK_CUR)


def _exif_rotates(tiff: bytes) -> bool:
    """True when the TIFF/EXIF block has an orientation tag other than 1 (upright)."""
    try:
        endian = "<" if tiff[:2] == b"II" else ">"
        (ifd,) = struct.unpack(endian + "I", tiff[4:8])
        (count,) = struct.unpack(endian + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, _typ, _n, value = struct.unpack(endian + "HHIH", entry[:10])
            if tag == 0x0112:
                return value != 1
    except struct.error:
        return True  # unreadable EXIF: be safe and decode
    return False


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` as ``cv2.imread`` would see it; reads only the header when it can."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                w, h = struct.unpack(">II", head[16:24])
                return int(w), int(h)
            if head[:2] == b"\xff\xd8":
                size = _jpeg_size(f)
                if size is not None:
                    return size
    except OSError as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from e
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"{path}: cannot decode image")
    return int(img.shape[1]), int(img.shape[0])


# ------------------------------------------------------------------------------------------
# Labels and parts
# ------------------------------------------------------------------------------------------


def read_label_file(path: str | Path, nc: int, width: int, height: int) -> np.ndarray:
    """Parse one YOLO label file into ``(N, 5)`` ``[cls, x1, y1, x2, y2]`` pixels (missing file = empty).

    Exact duplicate rows are dropped (as Ultralytics does); order is otherwise kept.
    """
    path = Path(path)
    if not path.exists():
        return np.zeros((0, 5), np.float32)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read label file ({e})") from e
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 5:
            raise DatasetError(
                f"{where}: expected 5 fields 'cls cx cy w h', got {len(fields)}: {line.strip()!r}"
            )
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(f"{where}: non-numeric value in {line.strip()!r}") from None
        if not all(np.isfinite(values)):
            raise DatasetError(f"{where}: non-finite value in {line.strip()!r}")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < nc:
            raise DatasetError(f"{where}: class id {fields[0]} out of range for {nc} classes")
        for name, raw, v in zip(("cx", "cy", "w", "h"), fields[1:], values[1:], strict=True):
            if not -COORD_TOL <= v <= 1 + COORD_TOL:
                raise DatasetError(f"{where}: {name}={raw} outside [0, 1]")
        rows.append(values)
    if not rows:
        return np.zeros((0, 5), np.float32)
    lb = np.asarray(rows, dtype=np.float64)
    _, first = np.unique(lb, axis=0, return_index=True)
    if len(first) < len(lb):
        lb = lb[np.sort(first)]
    cx, cy, w, h = lb[:, 1] * width, lb[:, 2] * height, lb[:, 3] * width, lb[:, 4] * height
    out = np.stack([lb[:, 0], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return out.astype(np.float32)


def yolo_label_line(cls: int, box: Sequence[float], width: float, height: float) -> str:
    """One YOLO label row ``cls cx cy w h`` (normalised, 6 decimals) for an xyxy box in pixels."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    return f"{cls} {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}"


def read_parts_file(path: str | Path) -> list[Part] | None:
    """Parse a ``parts`` sidecar; ``None`` when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot parse parts sidecar ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("parts"), list):
        raise DatasetError(f"{path}: expected an object with a 'parts' list")
    parts = []
    for i, p in enumerate(doc["parts"]):
        where = f"{path}: parts[{i}]"
        if not isinstance(p, dict):
            raise DatasetError(f"{where}: expected an object")
        missing = {"box", "product", "defective"} - set(p)
        if missing:
            raise DatasetError(f"{where}: missing {sorted(missing)}")
        box = p["box"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DatasetError(f"{where}: 'box' must be [x1, y1, x2, y2] numbers, got {box!r}")
        if not isinstance(p["defective"], bool):
            raise DatasetError(f"{where}: 'defective' must be true/false, got {p['defective']!r}")
        visible = p.get("visible", 1.0)
        if not isinstance(visible, (int, float)) or isinstance(visible, bool):
            raise DatasetError(f"{where}: 'visible' must be a number, got {visible!r}")
        parts.append(
            Part(
                box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                product=str(p["product"]),
                defective=p["defective"],
                visible=float(visible),
            )
        )
    return parts


def _sidecar_path(image: Path, folder: str, suffix: str) -> Path:
    s = str(image)
    a, b = f"{os.sep}images{os.sep}", f"{os.sep}{folder}{os.sep}"
    if a in s:
        head, tail = s.rsplit(a, 1)
        return Path(head + b + tail).with_suffix(suffix)
    return image.with_suffix(suffix)


# ------------------------------------------------------------------------------------------
# data.yaml
# ------------------------------------------------------------------------------------------


def _parse_names(raw: Any, yaml_path: Path) -> list[str]:
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_path}: 'names' keys must be integer class ids") from None
        if keys != list(range(len(keys))):
            raise DatasetError(f"{yaml_path}: 'names' ids must be 0..{len(keys) - 1}, got {keys}")
        by_id = {int(k): str(v) for k, v in raw.items()}
        return [by_id[i] for i in range(len(keys))]
    if isinstance(raw, list) and raw:
        return [str(v) for v in raw]
    raise DatasetError(f"{yaml_path}: 'names' must be a non-empty list or {{id: name}} mapping")


def _list_images(entry: Any, root: Path, yaml_path: Path, split: str) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for e in entries:
        p = Path(str(e))
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            images.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                line = line.strip()
                if line:
                    q = Path(line)
                    images.append(q if q.is_absolute() else (p.parent / q))
        else:
            raise DatasetError(f"{yaml_path}: split {split!r} points to {p}, which does not exist")
    return images


def load_dataset(directory: str | Path, splits: Sequence[str] | None = None) -> YoloDataset:
    """Load ``DIR/data.yaml`` (or the yaml file itself) and every split it names (or only ``splits``)."""
    directory = Path(directory)
    yaml_path = directory if directory.suffix in (".yaml", ".yml") else directory / "data.yaml"
    if not yaml_path.is_file():
        raise DatasetError(f"{yaml_path}: data.yaml not found")
    try:
        cfg = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as e:
        raise DatasetError(f"{yaml_path}: invalid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping")
    if "names" not in cfg:
        raise DatasetError(f"{yaml_path}: missing 'names'")
    names = _parse_names(cfg["names"], yaml_path)
    if "nc" in cfg and int(cfg["nc"]) != len(names):
        raise DatasetError(f"{yaml_path}: nc={cfg['nc']} but {len(names)} names")

    # 'path' may be absolute, relative to the yaml, or stale (dataset moved): fall back to the yaml's folder.
    root = yaml_path.parent
    if cfg.get("path"):
        p = Path(str(cfg["path"]))
        p = p if p.is_absolute() else yaml_path.parent / p
        if p.is_dir():
            root = p

    available = [s for s in SPLITS if cfg.get(s)]
    wanted = list(splits) if splits is not None else available
    for s in wanted:
        if s not in available:
            raise DatasetError(f"{yaml_path}: unknown split {s!r} (available: {available})")

    ds = YoloDataset(root=root.resolve(), names=names, yaml_path=yaml_path)
    for s in wanted:
        samples = []
        for img in _list_images(cfg[s], root, yaml_path, s):
            w, h = image_size(img)
            labels = read_label_file(_sidecar_path(img, "labels", ".txt"), len(names), w, h)
            parts = read_parts_file(_sidecar_path(img, "parts", ".json"))
            samples.append(Sample(image_path=img, labels=labels, parts=parts, width=w, height=h))
        ds.splits[s] = samples
    return ds
