"""Which retraining recipe learns a new product? Variants of the ``retrain`` preset on the cover line (GPU).

Trains each variant from the shipped checkpoint (``models/default``) on the cover line's 200 review
frames (160 train, 40 val: per-epoch recall on covers) plus ``replay`` frames of the default line,
then scores it with Ultralytics' validator on the cover line's 400 held-out frames. Training only:
no release, gate or split (``bench/learning_cycle.py`` runs the whole job). It showed that layers
0-4 frozen do not learn painted covers (test mAP50 0.40) and nothing frozen does (0.91).

    python bench/recipe_probe.py '[{"name": "base"}, {"name": "nofreeze", "freeze": 0}]' \
        --json docs/results/recipe_probe_cover_h100.json

Each variant: ``name``, optional ``replay`` (default 200), ``epochs`` (20), and preset overrides.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.synth.dataset import DatasetPreset, generate_dataset  # noqa: E402
from models.synth.lines import get_line  # noqa: E402
from models.train import PRESETS, train  # noqa: E402

ROOT = Path("runs/probe")


def link(src_img: Path, dst: Path, split: str, prefix: str = "") -> None:
    for sub in ("images", "labels"):
        (dst / sub / split).mkdir(parents=True, exist_ok=True)
    lab = src_img.parent.parent.parent / "labels" / src_img.parent.name / (src_img.stem + ".txt")
    shutil.copy(src_img, dst / "images" / split / (prefix + src_img.name))
    if lab.exists():
        shutil.copy(lab, dst / "labels" / split / (prefix + src_img.stem + ".txt"))


def build(field: Path, golden: Path, out: Path, replay: int) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    imgs = sorted((field / "images" / "train").iterdir())
    for i, p in enumerate(imgs[:200]):
        link(p, out, "train" if i < 160 else "val")
    for p in sorted((golden / "images" / "train").iterdir())[:replay]:
        link(p, out, "train", "replay_")
    for p in sorted((field / "images" / "test").iterdir()):
        link(p, out, "test")
    y = out / "data.yaml"
    y.write_text(json.dumps({"path": str(out.resolve()), "train": "images/train", "val": "images/val",
                             "test": "images/test", "names": {0: "scratch", 1: "crack", 2: "dent", 3: "stain"}}))
    return y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", help="JSON list of variants")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    t0 = time.time()
    field = ROOT / "field_cover"
    if not (field / "data.yaml").exists():
        generate_dataset(field, preset="field", line=get_line("cover"), workers=16, progress=False)
    golden = Path("data/synth/dataset")
    if not (golden / "data.yaml").exists():
        generate_dataset(golden, preset=DatasetPreset("default", 200, 0, 0), workers=16, progress=False)
    print(f"data {time.time()-t0:.0f}s", flush=True)
    variants = json.loads(args.variants)
    res = {}
    for v in variants:
        name = v.pop("name")
        replay = v.pop("replay", 200)
        epochs = v.pop("epochs", 20)
        y = build(field, golden, ROOT / f"data_{name}", replay)
        base = PRESETS["retrain"]
        pre = replace(base, name=f"probe_{name}", overrides={**base.overrides, "val": True, **v})
        t = time.time()
        r = train(y, preset=pre, project_dir=ROOT / "runs", weights=Path("models/default/checkpoint.pt"),
                  epochs=epochs, device="0", workers=8)
        secs = time.time() - t
        with open(r.run_dir / "results.csv") as f:
            rows = list(csv.DictReader(f))
        curve = [(int(float(row["epoch"])), round(float(row["metrics/recall(B)"]), 3),
                  round(float(row["metrics/mAP50(B)"]), 3)) for row in rows]
        from ultralytics import YOLO
        m = YOLO(str(r.run_dir / "weights" / "last.pt"))
        tv = m.val(data=str(y), split="test", imgsz=960, batch=32, device="0", plots=False, verbose=False)
        res[name] = {"train_s": round(secs, 1), "curve_val_recall_map50": curve,
                     "test": {"map50": float(tv.box.map50), "recall": float(tv.box.mr), "precision": float(tv.box.mp),
                              "per_class_map50": [float(x) for x in tv.box.ap50]}}
        print(name, json.dumps(res[name]), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
