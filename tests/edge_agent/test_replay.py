"""Replay of recorded video: the regression test on the committed sample, and bad input.

The agent runs here with torch, torchvision and ultralytics blocked from import, as on a
camera station that has none of them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "line_1080p.mp4"
TRUTH = REPO / "sample_data" / "line_1080p.truth.jsonl"
GOLDEN = REPO / "sample_data" / "line_1080p.golden.jsonl"
BUNDLE = REPO / "models" / "default"

RUN_AGENT = textwrap.dedent(
    """
    import importlib.abc, sys
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "ultralytics"}:
                raise ModuleNotFoundError(f"blocked import of {name}", name=name)
    sys.meta_path.insert(0, Blocker())
    from edge_agent.cli import main
    raise SystemExit(main(sys.argv[1:]))
    """
)


def agent(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUN_AGENT, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("replay")
    proc = agent("replay", SAMPLE, "--bundle", BUNDLE, "--out", out / "results.jsonl",
                 "--video", out / "annotated.mp4", "--expect", GOLDEN, "-q")
    return proc, out


def test_replay_matches_the_golden_file_without_torch(replayed: tuple) -> None:
    proc, out = replayed
    assert proc.returncode == 0, proc.stderr
    assert "golden:" in proc.stderr and "0 differences" in proc.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in rows] == list(range(300))
    assert rows[30]["pts"] == pytest.approx(1.0, abs=1e-3)
    for r in rows:
        for d in r["detections"]:
            assert set(d) == {"cls", "score", "box"} and d["cls"] in {"scratch", "crack", "dent", "stain"}
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= 1920 and 0 <= y1 < y2 <= 1080


def test_annotated_video_has_every_frame(replayed: tuple) -> None:
    _, out = replayed
    cap = cv2.VideoCapture(str(out / "annotated.mp4"))
    assert cap.isOpened()
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (1920, 1080)
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 300


def test_replay_finds_the_defects_in_the_ground_truth(replayed: tuple) -> None:
    """The default model on the sample: most labelled defects found; alarms judged per part.

    The 10 s sample carries 10 parts (2 defective). Model 1.0.0 catches both defective parts and
    flags one good part (part 4, a casing: a "scratch" along its seam in 65 frames, scores
    0.11-0.6); the test split's part-level figures over 1,365 good parts are in
    docs/benchmarks.md. A model that flags a second good part here fails this test.
    """
    _, out = replayed
    truth = [json.loads(line) for line in TRUTH.read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    found = total = 0
    defective: dict[int, bool] = {}
    flagged: set[int] = set()
    for t, r in zip(truth, rows, strict=True):
        for obj in t["objects"]:
            total += 1
            found += any(d["cls"] == obj["cls"] and _iou(d["box"], obj["box"]) >= 0.5 for d in r["detections"])
        for part in t["parts"]:
            defective[part["id"]] = part["defective"]
            x1, y1, x2, y2 = part["box"]
            for d in r["detections"]:
                cx, cy = (d["box"][0] + d["box"][2]) / 2, (d["box"][1] + d["box"][3]) / 2
                if x1 <= cx <= x2 and y1 <= cy <= y2:
                    flagged.add(part["id"])
    assert total > 100
    assert found / total >= 0.85, f"found {found} of {total} labelled defects"
    bad = [i for i, d in defective.items() if d]
    good = [i for i, d in defective.items() if not d]
    assert len(bad) == 2 and len(good) == 8
    assert all(i in flagged for i in bad), "a defective part went through unflagged"
    assert len(flagged & set(good)) <= 1, f"good parts flagged: {sorted(flagged & set(good))}"


@pytest.mark.parametrize(
    ("make_video", "message"),
    [
        (lambda p: p.write_bytes(b"this is not a video" * 100), "cannot be decoded"),
        (lambda p: p.write_bytes(SAMPLE.read_bytes()[: 200_000]), "cannot be decoded"),
        (lambda p: None, "does not exist"),
    ],
    ids=["garbage", "truncated", "missing"],
)
def test_unreadable_video_is_a_clear_error_and_writes_nothing(tmp_path: Path, make_video, message: str) -> None:
    video = tmp_path / "broken.mp4"
    make_video(video)
    proc = agent("replay", video, "--bundle", BUNDLE, "--out", tmp_path / "r.jsonl", "-q")
    assert proc.returncode == 2
    assert "broken.mp4" in proc.stderr and message in proc.stderr
    assert not (tmp_path / "r.jsonl").exists()
    assert not list(tmp_path.glob(".r.partial*"))


def test_tampered_bundle_is_refused_naming_the_file(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("checkpoint.pt"))
    model = bundle / "model_int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    proc = agent("replay", SAMPLE, "--bundle", bundle, "--out", tmp_path / "r.jsonl", "-q")
    assert proc.returncode == 2
    assert "model_int8.onnx" in proc.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_golden_mismatch_exits_1(tmp_path: Path) -> None:
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()][:300]
    # Claim a confident defect that the model never reports.
    golden[10]["detections"].append({"cls": "crack", "score": 0.99, "box": [5.0, 5.0, 60.0, 60.0]})
    bad = tmp_path / "golden.jsonl"
    bad.write_text("".join(json.dumps(g) + "\n" for g in golden))
    proc = agent("replay", SAMPLE, "--bundle", BUNDLE, "--out", tmp_path / "r.jsonl", "--expect", bad, "-q")
    assert proc.returncode == 1
    assert "frame 10: missing crack 0.99" in proc.stderr
