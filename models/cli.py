"""``lineguard-model``: synthetic data, training, export to a bundle, evaluation.

Subcommands that need torch/ultralytics (train, bundle) import them lazily, so
``lineguard-model eval`` and ``synth`` run on an edge install too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from models.synth.lines import LINES

__all__ = ["main"]

log = logging.getLogger("lineguard.model")


def _synth(args: argparse.Namespace) -> int:
    from models.synth import generate_dataset, generate_video

    out = Path(args.out)
    if not args.videos_only:
        path = generate_dataset(out / "dataset", seed=args.seed, preset=args.preset, workers=args.workers,
                                line=args.line)
        print(f"dataset: {path}", file=sys.stderr)
    if not args.dataset_only and args.line == "default":
        for w, h in ((1280, 720), (1920, 1080)):
            mp4 = out / "videos" / f"line_{h}p.mp4"
            generate_video(mp4, mp4.with_suffix(".truth.jsonl"), seed=args.seed, seconds=args.seconds,
                           size=(w, h))
            print(f"video: {mp4}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from models.train import train, train_recipe

    common = {"project_dir": Path(args.project), "device": args.device, "epochs": args.epochs,
              "workers": args.workers, "seed": args.seed, **({"cache": args.cache} if args.cache else {})}
    weights = Path(args.weights) if args.weights else None
    if args.resume:
        result = train(Path(args.data), preset=args.preset, hours=args.hours, resume=True, weights=weights,
                       **common)
    else:
        stages = args.stages.split(",") if args.stages else None
        result = train_recipe(Path(args.data), preset=args.preset, hours=args.hours, weights=weights,
                              stages=stages, **common)[-1]
    print(json.dumps(result.summary()))
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from models.release import release_bundle

    imgsz = tuple(int(v) for v in args.imgsz.split("x")) if args.imgsz else None
    manifest = release_bundle(
        checkpoint=Path(args.checkpoint), dataset_dir=Path(args.data), out_dir=Path(args.out),
        version=args.version, parent_version=args.parent_version, target_far=args.target_far,
        imgsz=imgsz, overwrite=args.overwrite,  # type: ignore[arg-type]
    )
    print(json.dumps({"bundle": str(args.out), "version": manifest.version,
                      "operating_conf": manifest.postprocessing.operating_conf,
                      "files": {k: v.path for k, v in manifest.files.items()}}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from models.bundle import BundleError, Postprocessing, load_bundle
    from models.dataset_io import DatasetError, load_dataset
    from models.evaluate import OnnxPredictor, evaluate

    try:
        roles = tuple(args.models)
        bundle = load_bundle(args.bundle, roles=roles)
        dataset = load_dataset(Path(args.data))
    except (BundleError, DatasetError, OSError) as exc:
        print(f"lineguard-model eval: error: {exc}", file=sys.stderr)
        return 2
    post: Postprocessing | dict[str, Any] = bundle.manifest.postprocessing or {}
    operating = args.operating_conf if args.operating_conf is not None else post.get("operating_conf")
    out: dict[str, object] = {"bundle": str(args.bundle), "version": bundle.manifest.version,
                              "split": args.split}
    for role in roles:
        predictor = OnnxPredictor(bundle.path(role), intra_op_threads=args.threads, multi_label=True)
        report = evaluate(predictor, dataset, split=args.split, operating_conf=operating,
                          progress=not args.quiet)
        out[role] = report.to_dict()
        log.info("%s: mAP50 %.4f mAP50-95 %.4f", role, report.map50, report.map50_95)
    # The last line is one JSON object; top-level map50/map50_95/per_class are the INT8 model's
    # (the one agents run) when it was evaluated, else the first model's.
    primary = out.get("onnx_int8") or out[roles[0]]
    assert isinstance(primary, dict)
    out.update({k: primary[k] for k in ("map50", "map50_95", "per_class", "part_level")})
    print(json.dumps(out))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from models.signing import generate_keypair

    priv, pub = generate_keypair(Path(args.out), args.name)
    print(f"private key {priv} (keep it on the hub only), public key {pub} (provision it on every agent)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from models.signing import load_private_key, sign_bundle

    print(f"signed: {sign_bundle(Path(args.bundle), load_private_key(Path(args.key)))}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from models.signing import SignatureError, load_public_keys, verify_bundle

    try:
        b = verify_bundle(Path(args.bundle), load_public_keys([Path(p) for p in args.pubkey]), roles=())
    except SignatureError as exc:
        print(f"lineguard-model verify: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a file whose hash or size differs: BundleError from load_bundle
        print(f"lineguard-model verify: {exc}", file=sys.stderr)
        return 1
    print(f"{args.bundle}: bundle {b.manifest.version}, signature and {len(b.manifest.files)} file hashes good")
    return 0


def _split(args: argparse.Namespace) -> int:
    from models.split_bundle import add_split_parts

    metrics = json.loads(Path(args.report).read_text()) if args.report else None
    m = add_split_parts(Path(args.bundle), Path(args.bottleneck), Path(args.data), version=args.version,
                        out=Path(args.out), overwrite=args.overwrite, metrics=metrics)
    print(f"bundle {args.out} v{m.version} (parent {m.parent_version}): split {m.split and m.split['spec']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lineguard-model", description="LineGuard model tools")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate the synthetic inspection line (dataset and videos)")
    s.add_argument("--out", default="data/synth")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", default="default", help="dataset size preset: default, field, small, tiny")
    s.add_argument("--line", default="default", choices=sorted(LINES),
                   help="products and defects: default; porosity (a new defect type); cover (a new "
                        "product); videos are of the default line only")
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--seconds", type=float, default=60.0, help="length of each video")
    s.add_argument("--dataset-only", action="store_true")
    s.add_argument("--videos-only", action="store_true")
    s.set_defaults(func=_synth)

    t = sub.add_parser("train", help="train the detector from scratch (needs the train extra)")
    t.add_argument("--data", required=True, help="data.yaml of a YOLO-format dataset")
    t.add_argument("--preset", default="default")
    t.add_argument("--project", default="runs/train")
    t.add_argument("--device", default=None, help="cpu, 0, 0,1 ... (default: Ultralytics picks)")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--hours", type=float, default=None, help="wall-time cap")
    t.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cache", default=None, choices=[None, "ram", "disk"])
    t.add_argument("--resume", action="store_true")
    t.add_argument("--weights", default=None, help="continue from this checkpoint (second stage)")
    t.add_argument("--stages", default=None, help="comma-separated stages of the preset's recipe to run "
                   "(default: all; `default` is default,default-finetune)")
    t.set_defaults(func=_train)

    b = sub.add_parser("bundle", help="export a checkpoint to ONNX FP32 + INT8, measure, write a bundle")
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--data", required=True, help="dataset: train calibrates INT8, val sets the threshold")
    b.add_argument("--out", required=True)
    b.add_argument("--version", required=True)
    b.add_argument("--parent-version", default=None)
    b.add_argument("--imgsz", default=None, help="model input HxW, e.g. 544x960 (default: training size)")
    b.add_argument("--target-far", type=float, default=0.002, help="good-part false-alarm rate on val")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_bundle)

    sp = sub.add_parser("split", help="add a trained bottleneck's split parts to a bundle (a new version)")
    sp.add_argument("--bundle", required=True)
    sp.add_argument("--bottleneck", required=True, help=".pt from python -m models.split_train")
    sp.add_argument("--data", required=True, help="dataset: train calibrates the INT8 parts")
    sp.add_argument("--version", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--report", default=None, help="split report JSON (bench/split_report.py) to record")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=_split)

    kg = sub.add_parser("keygen", help="an Ed25519 key pair for signing bundles (private key mode 0600)")
    kg.add_argument("--out", required=True)
    kg.add_argument("--name", default="lineguard-bundles")
    kg.set_defaults(func=_keygen)
    sg = sub.add_parser("sign", help="sign a bundle's manifest (writes manifest.sig)")
    sg.add_argument("--bundle", required=True)
    sg.add_argument("--key", required=True, help="PEM private key")
    sg.set_defaults(func=_sign)
    vf = sub.add_parser("verify", help="check a bundle's signature and every file's hash; exit 1 if not good")
    vf.add_argument("--bundle", required=True)
    vf.add_argument("--pubkey", required=True, action="append", help="trusted PEM public key (repeatable)")
    vf.set_defaults(func=_verify)

    e = sub.add_parser("eval", help="mAP and part-level figures of a bundle on a dataset")
    e.add_argument("--bundle", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--models", nargs="+", default=["onnx_fp32", "onnx_int8"])
    e.add_argument("--operating-conf", type=float, default=None)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
