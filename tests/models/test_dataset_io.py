"""Reading Ultralytics-layout datasets with parts sidecars (models.dataset_io)."""

from __future__ import annotations

import json
import struct

import cv2
import numpy as np
import pytest
import yaml

from models.dataset_io import DatasetError, Part, image_size, load_dataset

GOOD_PARTS = [
    {"box": [0, 0, 32, 48], "product": "bracket", "defective": True, "visible": 1.0},
    {"box": [32, 0, 64, 48], "product": "flange", "defective": False, "visible": 0.3},
]


def test_load_dataset_happy_path(make_dataset):
    root = make_dataset(
        {
            "train": {"a": {"size": (64, 48), "labels": "0 0.5 0.5 0.25 0.5\n"}},
            "val": {
                "b": {
                    "size": (200, 100),
                    "labels": "3 0.1 0.2 0.2 0.4\n1 0.5 0.5 1 1\n",
                    "parts": GOOD_PARTS,
                },
                "c": {"size": (80, 60), "labels": ""},  # empty label file: background image
                "d": {"size": (80, 60), "labels": None, "ext": ".png"},  # no label file: background
            },
        }
    )
    ds = load_dataset(root)
    assert ds.names == ["scratch", "crack", "dent", "stain"] and ds.nc == 4
    assert sorted(ds.splits) == ["train", "val"]
    (a,) = ds.split("train")
    np.testing.assert_allclose(a.labels, [[0, 24, 12, 40, 36]])
    assert (a.width, a.height) == (64, 48) and a.parts is None
    b, c, d = ds["val"]
    assert [s.image_path.stem for s in (b, c, d)] == ["b", "c", "d"]
    np.testing.assert_allclose(b.labels, [[3, 0, 0, 40, 40], [1, 0, 0, 200, 100]])
    assert b.parts == [
        Part((0.0, 0.0, 32.0, 48.0), "bracket", True, 1.0),
        Part((32.0, 0.0, 64.0, 48.0), "flange", False, 0.3),
    ]
    assert c.labels.shape == (0, 5) and d.labels.shape == (0, 5)
    assert (d.width, d.height) == (80, 60)
    assert d.read().shape == (60, 80, 3)


def test_load_dataset_moved_and_yaml_path(make_dataset, tmp_path):
    root = make_dataset({"test": {"x": {"labels": "2 0.5 0.5 0.5 0.5"}}})
    cfg = yaml.safe_load((root / "data.yaml").read_text())
    cfg["path"] = str(tmp_path / "somewhere-else")  # stale absolute path: falls back to the yaml's folder
    cfg["names"] = ["scratch", "crack", "dent", "stain"]  # list form
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    ds = load_dataset(root / "data.yaml", splits=["test"])
    assert len(ds.split("test")) == 1 and ds.split("test")[0].labels[0, 0] == 2


def test_duplicate_label_rows_dropped(make_dataset):
    root = make_dataset(
        {"val": {"a": {"labels": "1 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n1 0.5 0.5 0.2 0.2\n"}}}
    )
    lb = load_dataset(root)["val"][0].labels
    assert lb[:, 0].tolist() == [1, 0]  # original order kept, duplicate removed


BAD_LABELS = [
    # (label text, error pattern naming file:line)
    ("0 0.5 0.5 0.1\n", r"a\.txt:1: expected 5 fields"),
    ("0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1 0.1 0.2 0.3\n", r"a\.txt:2: expected 5 fields"),
    ("0 0.5 abc 0.1 0.1\n", r"a\.txt:1: non-numeric"),
    ("4 0.5 0.5 0.1 0.1\n", r"a\.txt:1: class id 4 out of range for 4 classes"),
    ("-1 0.5 0.5 0.1 0.1\n", r"a\.txt:1: class id -1 out of range"),
    ("1.5 0.5 0.5 0.1 0.1\n", r"a\.txt:1: class id 1.5"),
    ("\n0 1.002 0.5 0.1 0.1\n", r"a\.txt:2: cx=1.002 outside \[0, 1\]"),
    ("0 0.5 -0.01 0.1 0.1\n", r"a\.txt:1: cy=-0.01 outside"),
    ("0 0.5 0.5 0.1 nan\n", r"a\.txt:1: non-finite"),
]


@pytest.mark.parametrize(("text", "error"), BAD_LABELS)
def test_bad_label_lines(make_dataset, text, error):
    root = make_dataset({"val": {"a": {"labels": text}}})
    with pytest.raises(DatasetError, match=error):
        load_dataset(root)


@pytest.mark.parametrize(
    "text", ["0 1.0005 0.5 0.1 0.1\n", "0 -0.0009 0 1 1\n", "  \n3 0.5 0.5 1.0 1.0\n\n"]
)  # within the 1e-3 tolerance / blank lines
def test_label_tolerance_accepted(make_dataset, text):
    root = make_dataset({"val": {"a": {"labels": text}}})
    assert len(load_dataset(root)["val"][0].labels) == 1


BAD_PARTS = [
    ({"parts": "nope"}, r"a\.json: expected an object with a 'parts' list"),
    ({"parts": [{"box": [0, 0, 1], "product": "x", "defective": True}]}, r"parts\[0\]: 'box'"),
    ({"parts": [{"box": [0, 0, 1, 1], "defective": True}]}, r"parts\[0\]: missing \['product'\]"),
    ({"parts": [{"box": [0, 0, 1, 1], "product": "x", "defective": "yes"}]}, r"'defective' must be"),
    ({"parts": [{"box": [0, 0, 1, 1], "product": "x", "defective": True, "visible": "1"}]}, r"'visible'"),
]


@pytest.mark.parametrize(("doc", "error"), BAD_PARTS)
def test_bad_parts_sidecar(make_dataset, doc, error):
    root = make_dataset({"val": {"a": {"labels": ""}}})
    (root / "parts" / "val" / "a.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=error):
        load_dataset(root)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda cfg: cfg.pop("names"), r"data\.yaml: missing 'names'"),
        (lambda cfg: cfg.update(names={0: "a", 2: "b"}), r"ids must be 0\.\.1"),
        (lambda cfg: cfg.update(nc=3), r"nc=3 but 4 names"),
        (lambda cfg: cfg.update(val="images/nowhere"), r"split 'val' points to .*nowhere"),
    ],
)
def test_bad_data_yaml(make_dataset, mutate, error):
    root = make_dataset({"val": {"a": {"labels": ""}}})
    cfg = yaml.safe_load((root / "data.yaml").read_text())
    mutate(cfg)
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DatasetError, match=error):
        load_dataset(root)


def test_missing_yaml_and_unknown_split(make_dataset, tmp_path):
    with pytest.raises(DatasetError, match=r"data\.yaml not found"):
        load_dataset(tmp_path / "empty")
    root = make_dataset({"val": {"a": {"labels": ""}}})
    with pytest.raises(DatasetError, match=r"unknown split 'test'"):
        load_dataset(root, splits=["test"])
    ds = load_dataset(root)
    with pytest.raises(DatasetError, match=r"unknown split 'train'.*available: \['val'\]"):
        ds.split("train")
    assert issubclass(DatasetError, ValueError)


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert a minimal APP1/EXIF segment carrying an orientation tag after SOI."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize(
    ("ext", "shape", "orientation", "expected"),
    [
        (".jpg", (37, 91), None, (91, 37)),
        (".png", (120, 33), None, (33, 120)),
        (".bmp", (10, 20), None, (20, 10)),  # cv2 fallback
        (".jpg", (40, 100), 1, (100, 40)),  # upright EXIF: header size
        (".jpg", (40, 100), 6, (40, 100)),  # rotated 90: cv2.imread applies it, so must we
    ],
)
def test_image_size_matches_cv2(tmp_path, ext, shape, orientation, expected):
    path = tmp_path / f"img{ext}"
    ok, buf = cv2.imencode(ext, np.zeros((*shape, 3), np.uint8))
    assert ok
    data = buf.tobytes()
    if orientation is not None:
        data = _with_exif_orientation(data, orientation)
    path.write_bytes(data)
    assert image_size(path) == expected
    img = cv2.imread(str(path))
    assert (img.shape[1], img.shape[0]) == expected
