"""One review-and-retrain cycle on a synthetic line the production model never saw (issue 6).

Lines (``models/synth/lines.py``): ``porosity``, the default products with a fifth defect type
(porosity) on half of the defects; ``cover``, a new product (painted covers) with the four default
defects. For a line, this script:

1. renders the line's ``field`` dataset (200 frames reviewers may label, 400 held-out test frames);
2. builds a hub (SQLite, blob store, the production bundle registered as ``production``) and
   sends ``--reviews`` frames through the real ingest pipeline, as an agent's samples (the
   production model's detections at its operating threshold attached);
3. reviews them as QA staff would: a reviewer adds the new class, confirms each frame with its true
   boxes or rejects a frame without defects (the synthetic ground truth is the reviewer);
4. runs the hub's retraining job (``hub.retrain.RetrainJob``: snapshot, dataset + replay buffer,
   train, release INT8, split parts, gate, sign, register), timed: the retraining time target;
5. scores production and candidate on the held-out test frames (per-class recall at each model's
   operating threshold, mAP50, part-level recall and false alarms) and takes the golden-set
   figures (old classes) from the gate report.

    python bench/learning_cycle.py --line porosity --json docs/results/learning_cycle_porosity_cpu.json
    python bench/learning_cycle.py --line cover --device 0 --json docs/results/learning_cycle_cover_h100.json

Targets: porosity recall < 20% -> >= 90% with old classes' golden mAP50 down <= 1 point; cover
part-level recall >= 95%; the retraining job <= 20 min on the 2-core CPU (<= 2 min on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from _common import cpu_model, emit_json  # noqa: E402
from _cycle_hub import build_hub, report_fleet, review_samples, send_samples  # noqa: E402
from _trace import UsageTrace, mean_between  # noqa: E402

from hub.gate import GateRule, mapped_predictor, score  # noqa: E402
from hub.gate_scoring import operating_conf  # noqa: E402
from hub.retrain import RetrainJob, RetrainSettings  # noqa: E402
from hub.retrain_data import replay_limits  # noqa: E402
from models.bundle import Bundle, load_bundle, write_bundle  # noqa: E402
from models.dataset_io import YoloDataset, load_dataset  # noqa: E402
from models.onnx_predict import OnnxPredictor  # noqa: E402
from models.synth import generate_dataset  # noqa: E402
from models.synth.lines import get_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _predictor(bundle: Bundle, names: list[str]) -> Any:
    return mapped_predictor(OnnxPredictor(bundle.path("onnx_int8"), multi_label=True), list(bundle.manifest.classes),
                            names)


def field_scores(bundle: Bundle, field: YoloDataset) -> dict[str, Any]:
    sc = score(_predictor(bundle, list(field.names)), field, "test", operating_conf(bundle), progress=True)
    out = sc.to_dict()
    out.pop("confusion")
    cm = sc.confusion
    # per true class: the share of its boxes any detection (of any class) overlapped, at the threshold
    out["caught_any_class"] = {n: (float(1 - cm[i, -1] / cm[i].sum()) if cm[i].sum() else None)
                               for i, n in enumerate(sc.names)}
    out["version"] = bundle.manifest.version
    return out


def _without_split(production: Path, out: Path) -> Path:
    """``production``'s whole model as a bundle of its own, without split parts (a fleet without split agents)."""
    roles = ("onnx_fp32", "onnx_int8", "checkpoint")
    b = load_bundle(production, roles=roles)
    m = b.manifest
    write_bundle(out, name=m.name, version=m.version, parent_version=m.parent_version, classes=m.classes,
                 input_size=m.input_size, files={r: b.path(r) for r in roles}, preprocessing=m.preprocessing,
                 postprocessing=m.postprocessing, quantization=m.quantization, metrics=m.metrics,
                 training=m.training, overwrite=True)
    return out


def _replay_data(golden: Path, out: Path, val_frames: int) -> Path:
    """What production was trained on, as a hub's replay data: the golden set's dataset's train split
    (the default model's first training frames), and for validation ``val_frames`` frames of the
    default line's held-out test split (seed 0). Not the golden set's val split: a job leaves
    golden-set images out, so that split would give it no replay validation at all (sixteenth session;
    runs before it validated on 150 golden frames)."""
    if (out / "data.yaml").exists():
        return out
    from models.synth.dataset import DatasetPreset

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    render = generate_dataset(tmp / "render", seed=0, preset=DatasetPreset("replay-val", 0, 0, val_frames),
                              progress=False)
    for kind in ("images", "labels", "parts"):
        (tmp / kind).mkdir(parents=True)
        (tmp / kind / "train").symlink_to((golden / kind / "train").resolve(), target_is_directory=True)
        (render / kind / "test").rename(tmp / kind / "val")
    shutil.rmtree(render)
    names = yaml.safe_load((golden / "data.yaml").read_text())["names"]
    (tmp / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                   "names": names}, sort_keys=False))
    tmp.rename(out)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    line = get_line(args.line)
    work = Path(args.work).resolve() / line.name
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    field_dir = work.parent / f"field_{line.name}"
    if not (field_dir / "data.yaml").exists():
        generate_dataset(field_dir, seed=args.seed, preset="field", line=line)
    field = load_dataset(field_dir, splits=["train", "test"])
    # rendered before any thread starts here (the synthesizer's worker processes are forked)
    val_frames = replay_limits(args.replay_images, args.replay_val_images)["val"]
    replay = (Path(args.replay).resolve() if args.replay else
              _replay_data(Path(args.golden).resolve(), work.parent / f"replay_val{val_frames}", val_frames))
    production = _without_split(Path(args.production), work / "production") if args.no_split else Path(args.production)
    prod = load_bundle(production, roles=("onnx_int8",))

    sessions, blobs = build_hub(work, production.resolve())
    t0 = time.perf_counter()
    ids = send_samples(sessions, blobs, field, args.reviews, prod, line.name)
    if args.fleet_mode:
        report_fleet(sessions, blobs, line.name, prod.manifest.version, args.fleet_mode)
    review = review_samples(sessions, field, ids)
    t_ingest = time.perf_counter() - t0

    preset = _base_preset(args)
    variant = _preset_variant(args)
    if variant:  # a variant, this run only
        from dataclasses import replace as _replace

        from models.train import PRESETS

        base = PRESETS[preset]
        batch = variant.pop("batch", base.batch)
        preset = f"{preset}-bench"
        PRESETS[preset] = _replace(base, name=preset, batch=batch, overrides={**base.overrides, **variant})
    settings = RetrainSettings(
        golden=Path(args.golden).resolve(), bundles_dir=work / "bundles", signing_key=None,
        replay_data=replay, replay_images=args.replay_images, replay_val_images=args.replay_val_images,
        reviewed_repeats=args.reviewed_repeats,
        preset=preset, epochs=args.epochs, hours=args.hours, device=args.device, workers=args.workers,
        val_share=args.val_share, split_retune_steps=args.split_retune_steps,
        **({} if args.calib_images is None else {"calib_images": args.calib_images}), rule=GateRule(
            max_recall_drop=args.max_recall_drop / 100,
            max_false_alarm_rise=None if args.max_false_alarm_rise < 0 else args.max_false_alarm_rise / 100))
    settings = _with_signing_key(settings, work)
    warmup_s = _warm_detection_cache(settings, prod) if args.warm_cache else None
    with UsageTrace() as trace:
        t0 = time.perf_counter()
        state = RetrainJob.create(work / "jobs", settings, sessions, blobs).run()
        retrain_s = time.perf_counter() - t0
    if state.status == "failed":
        raise SystemExit(f"retraining failed: {state.error}")
    job = work / "jobs" / state.job_id
    gate = json.loads((job / "gate" / "gate.json").read_text())
    cand = load_bundle(work / "bundles" / str(state.candidate_version), roles=("onnx_int8",))
    before, after = field_scores(prod, field), field_scores(cand, field)
    res = _summary(args, line.name, review, t_ingest, state, retrain_s, gate, before, after, job)
    split = cand.manifest.split or {}
    res["retrain"]["split"] = {"metrics": split.get("metrics"),
                               "export_steps_s": (split.get("export") or {}).get("steps")}
    res["retrain"]["export_s"] = (cand.manifest.training or {}).get("export_seconds")
    res["retrain"]["warm_detection_cache_s"] = warmup_s
    res["retrain"]["usage"] = _usage_by_step(trace, t0, res["retrain"]["steps_s"])
    return res


def _usage_by_step(trace: UsageTrace, job_t0: float, steps_s: dict[str, float]) -> dict[str, Any]:
    """Mean host CPU (% of all cores) and GPU busy (%) over each step of the job (the steps run one
    after another, in ``steps_s``' order), and the samples themselves."""
    start, by_step = job_t0 - trace.t0, {}
    for step, secs in steps_s.items():
        if secs >= 1.0:
            by_step[step] = {"cpu": mean_between(trace.samples, start, start + secs, "cpu"),
                             "gpu": mean_between(trace.samples, start, start + secs, "gpu")}
        start += secs
    return {"by_step": by_step, "cores": os.cpu_count(), "job_start_s": round(job_t0 - trace.t0, 3),
            "samples": trace.samples}


def _base_preset(args: argparse.Namespace) -> str:
    """``--preset``; ``auto`` as the hub resolves it: every layer on a GPU, crops and layers 5+ on a CPU."""
    if args.preset != "auto":
        return str(args.preset)
    return "retrain" if str(args.device or "cpu") != "cpu" else "retrain-cpu"


def _preset_variant(args: argparse.Namespace) -> dict[str, Any]:
    """The training arguments this run changes from the preset: ``--freeze``, ``--lr0``,
    ``--train-seed`` and each ``--set key=value`` (the value read as YAML: ``batch=32``, ``cos_lr=true``)."""
    over: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value")
        over[key.strip()] = yaml.safe_load(value)
    for key, value in (("freeze", args.freeze), ("lr0", args.lr0), ("seed", args.train_seed)):
        if value is not None:
            over[key] = value
    return over


def _warm_detection_cache(settings: RetrainSettings, prod: Any) -> float:
    """Production's golden-set detections into the hub's detection cache before the job starts, as
    a hub finds them from its second job on (the gate cached them when production was a candidate);
    returns the seconds it took (not part of the job's time). Matplotlib's font cache is built too:
    a fresh host builds it once, in its first job (8.5 s on the H100 host, 2026-11-24)."""
    import matplotlib.font_manager  # noqa: F401 - builds the font cache on a fresh host

    from hub.gate import fingerprint
    from hub.gate_scoring import GateScorer
    from models.dataset_io import load_dataset

    t0 = time.perf_counter()
    golden = load_dataset(settings.golden, splits=["val"])
    GateScorer(settings.bundles_dir / ".detections", workers=settings.score_workers).pair(
        golden, fingerprint(settings.golden), prod, prod)
    return round(time.perf_counter() - t0, 1)


def _with_signing_key(settings: RetrainSettings, work: Path) -> RetrainSettings:
    """A throwaway signing key for this run (the bench measures the job, signing included)."""
    from dataclasses import replace

    from models.signing import generate_keypair

    priv, _ = generate_keypair(work / "keys")
    return replace(settings, signing_key=priv)


def _called_new_class(cand: dict[str, Any], prod: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Golden boxes (by true class, ``background`` for no box) the candidate called a class production
    does not know, from the candidate's golden confusion matrix (the gate keeps those detections)."""
    cm, names = cand["confusion"], cand["names"]
    rows = [*names, "background"]
    return {new: {rows[i]: int(cm[i][j]) for i in range(len(rows)) if cm[i][j]}
            for j, new in enumerate(names) if new not in prod["names"]}


def _summary(args: argparse.Namespace, line: str, review: dict[str, int], t_ingest: float, state: Any,
             retrain_s: float, gate: dict[str, Any], before: dict[str, Any], after: dict[str, Any],
             job: Path) -> dict[str, Any]:
    g_c, g_p = gate["golden"]["candidate"], gate["golden"]["production"]
    dataset = json.loads((job / "dataset.json").read_text())
    train = json.loads((job / "train.json").read_text())
    res: dict[str, Any] = {
        "line": line, "reviews": args.reviews, "review": review, "ingest_and_review_s": round(t_ingest, 1),
        "retrain": {"seconds": round(retrain_s, 1), "steps_s": state.seconds, "status": state.status,
                    "preset": _base_preset(args), "freeze": args.freeze, "lr0": args.lr0, "train_seed": args.train_seed,
                    "set": args.set, "epochs": args.epochs, "production_split": not args.no_split,
                    "hours": args.hours, "device": args.device, "fleet_mode": args.fleet_mode,
                    "split_parts": json.loads((job / "snapshot.json").read_text()).get("split_parts"),
                    "replay_images": args.replay_images, "replay_val_images": args.replay_val_images,
                    "reviewed_repeats": args.reviewed_repeats,
                    "calib_images": args.calib_images,
                    "dataset": dataset, "train_metrics": train.get("metrics"),
                    "gate_passed": state.gate_passed, "gate_reasons": state.gate_reasons},
        "golden": {"production_map50": g_p["map50"], "candidate_map50": g_c["map50"],
                   "map50_change_points": round(100 * (g_c["map50"] - g_p["map50"]), 2),
                   "recall_production": g_p["recall_at_operating"], "recall_candidate": g_c["recall_at_operating"],
                   "part_false_alarms": next((c for c in gate["checks"] if c["check"] == "golden part false alarms"),
                                             None),
                   "split_parts": next((c for c in gate["checks"] if c["check"] == "golden split mAP50"), None),
                   "called_new_class": _called_new_class(g_c, g_p)},
        "field_test": {"production": before, "candidate": after},
    }
    targets: dict[str, Any] = {"golden_map50_drop_le_1pt": res["golden"]["map50_change_points"] >= -1.0}
    if line == "porosity":
        rb, ra = before["recall_at_operating"]["porosity"], after["recall_at_operating"]["porosity"]
        res["new_class"] = {"name": "porosity", "recall_before": rb, "recall_after": ra}
        targets.update({"new_class_recall_before_lt_20": (rb or 0.0) < 0.2,
                        "new_class_recall_after_ge_90": (ra or 0.0) >= 0.9})
    else:
        pb, pa = before["part_level"], after["part_level"]
        res["new_product"] = {"part_recall_before": pb["recall"], "part_recall_after": pa["recall"],
                              "false_alarm_before": pb["false_alarm_rate"], "false_alarm_after": pa["false_alarm_rate"]}
        targets["part_recall_after_ge_95"] = pa["recall"] >= 0.95
    limit = 120 if args.device not in (None, "cpu") else 1200
    targets[f"retrain_le_{limit}s"] = retrain_s <= limit
    res["targets"] = targets
    res["machine"] = {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                      "python": platform.python_version(), "device": args.device or "cpu"}
    res["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--line", required=True, choices=["porosity", "cover"])
    p.add_argument("--reviews", type=int, default=200, help="frames QA staff review (<= 200 for the target)")
    p.add_argument("--production", default=str(ROOT / "models" / "default"))
    p.add_argument("--no-split", action="store_true",
                   help="production without its split parts: a fleet without split agents (no split step)")
    p.add_argument("--golden", default=str(ROOT / "data" / "synth" / "dataset"), help="golden set (its val split)")
    p.add_argument("--replay", default=None, help="replay data (default: the golden set's dataset's train split "
                   "and frames of the default line's test split for validation)")
    p.add_argument("--replay-images", type=int, default=600, help="the hub config's default")
    p.add_argument("--fleet-mode", choices=["full", "split", "auto"], default=None,
                   help="the line's agent reports this split mode in a heartbeat (default: no agent heard from)")
    p.add_argument("--calib-images", type=int, default=None,
                   help="INT8 calibration frames (default: the hub config's, 100)")
    p.add_argument("--replay-val-images", type=int, default=None,
                   help="replay frames in validation (default: a quarter of --replay-images, as the hub's)")
    p.add_argument("--reviewed-repeats", type=int, default=1, help="each reviewed training frame placed N times")
    p.add_argument("--preset", default="auto",
                   help="models/train.py preset; auto (the hub's default): retrain with --device 0, else retrain-cpu")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--freeze", type=int, default=None, help="override the preset's frozen layers")
    p.add_argument("--lr0", type=float, default=None, help="override the preset's learning rate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another training argument for this run (e.g. batch=32; repeatable)")
    p.add_argument("--train-seed", type=int, default=None, help="Ultralytics' seed (default 0): run-to-run spread")
    p.add_argument("--hours", type=float, default=None, help="training time budget (Ultralytics fits the epochs)")
    p.add_argument("--device", default=None, help="cpu (default), 0 for the first GPU")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: the hub's, by cores)")
    p.add_argument("--split-retune-steps", type=int, default=200, help="the hub config's default")
    p.add_argument("--warm-cache", action="store_true",
                   help="production's golden detections cached before the job (a hub's second job on)")
    p.add_argument("--val-share", type=float, default=0.2)
    p.add_argument("--max-recall-drop", type=float, default=1.0, help="gate rule, points")
    p.add_argument("--max-false-alarm-rise", type=float, default=1.0,
                   help="gate rule, points of good parts on the golden set; negative: not checked")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(ROOT / "runs" / "learning_cycle"))
    p.add_argument("--keep", action="store_true", help="keep an earlier run's hub directory")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", action="store_true", help="the job's log (INFO, with times) on stderr")
    args = p.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, datefmt="%H:%M:%S",
                            format="%(asctime)s.%(msecs)03d %(processName)s %(name)s: %(message)s")
    if args.reviews > 200:
        print("note: the target is for <= 200 reviewed samples", file=sys.stderr)
    res = run(args)
    emit_json(res, Path(args.json) if args.json else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
