"""Export a trained bottleneck with its detector as the two ONNX parts of a split bundle.

- ``split_edge_fp32.onnx``: image ``(N, 3, H, W)`` float -> ``codes (N, width, h, w)`` uint8;
- ``split_edge_int8.onnx``: the same, INT8 (QDQ) like the full model, the quantizer (sigmoid,
  scale, round, cast) kept in float so the codes stay exact integers;
- ``split_hub.onnx``: ``codes`` uint8 -> ``output0 (N, 4 + nc, anchors)``, the same output as
  the whole model's ONNX, so the same post-processing applies; INT8 (QDQ, the Detect decode tail in
  float, as the full model) calibrated on the edge part's codes, for CPU hubs.

Each file carries the bundle's ``lineguard.*`` metadata plus ``lineguard.split`` (the
:class:`~models.feature_codec.FeatureSpec` as JSON), which the agent and the head service check
against the manifest before they exchange a single feature.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from models.bottleneck import Bottleneck, SplitEdge, SplitHub, crossing_channels, detection_model, spec_for
from models.feature_codec import FeatureSpec
from models.onnx_meta import metadata_from_manifest_fields, write_metadata

__all__ = ["SPLIT_ROLES", "export_split_parts"]

log = logging.getLogger(__name__)

SPLIT_ROLES = ("split_edge_fp32", "split_edge_int8", "split_hub")  # split_hub: INT8 when calibrated, else FP32
OPSET = 17


def _export(module: torch.nn.Module, dummy: torch.Tensor, path: Path, in_name: str, out_name: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (dummy,), str(tmp), input_names=[in_name], output_names=[out_name],
                          dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    if tmp.stat().st_size == 0:
        raise RuntimeError(f"{path}: the ONNX export wrote an empty file")
    tmp.replace(path)


def quantize_hub_int8(hub_fp32: Path, out: Path, edge_fp32: Path, calib_paths: list[Path],
                      imgsz: tuple[int, int]) -> dict[str, Any]:
    """INT8 (QDQ) of the hub part, with the full model's recipe (per-channel weights, the Detect
    head's decode tail in float); calibrated on the codes the edge part makes of ``calib_paths``."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    from models.calibration import minmax_ranges, use_threaded_minmax
    from models.head_tail import find_head_tail
    from models.quantize import (
        DEFAULT_ACTIVATION_TYPE,
        DEFAULT_REDUCE_RANGE,
        DEFAULT_WEIGHT_TYPE,
        _preprocess,
        _qtype,
        calibration_batches,
    )

    edge = ort.InferenceSession(str(edge_fp32), providers=["CPUExecutionProvider"])

    class _Codes(CalibrationDataReader):
        """The edge part's codes of :data:`~models.quantize.CALIBRATION_BATCH` frames at a time (MinMax)."""

        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self._it, None)
            return None if batch is None else {"codes": edge.run(None, {"images": batch})[0]}

        def rewind(self) -> None:
            self._it = calibration_batches(calib_paths, imgsz)

    t0 = time.perf_counter()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lg_hubq_") as tmp:
        pre = _preprocess(hub_fp32, Path(tmp) / "pre.onnx", notes)
        tail = find_head_tail(pre)
        tmp_out = out.with_name(out.name + ".tmp")
        reader, ranges = _Codes(), None
        if use_threaded_minmax():  # MinMax reduced in threads (models/calibration.py), read back by quantize_static
            ranges = Path(tmp) / "minmax_ranges.json"
            minmax_ranges(pre, iter(reader.get_next, None), ranges)
            reader.rewind()
        quantize_static(str(pre), str(tmp_out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=DEFAULT_REDUCE_RANGE, activation_type=_qtype(DEFAULT_ACTIVATION_TYPE),
                        weight_type=_qtype(DEFAULT_WEIGHT_TYPE), nodes_to_exclude=list(tail.nodes),
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=ranges)
        tmp_out.replace(out)
    return {"method": "static", "format": "QDQ", "per_channel": True, "calibration_images": len(calib_paths),
            "excluded_nodes": len(tail.nodes), "seconds": round(time.perf_counter() - t0, 2), "notes": notes}


def export_split_parts(model: Any, bottleneck: Bottleneck, cut: int, out_dir: Path, *, imgsz: tuple[int, int],
                       classes: list[str], version: str, calib_data: Path | None,
                       preprocessing: dict[str, Any] | None = None,
                       calib_images: int = 100,
                       hub_int8: bool = True) -> tuple[dict[str, Path], FeatureSpec, dict[str, Any]]:
    """Write the three parts into ``out_dir``; returns ``(paths by role, spec, report)``."""
    det = detection_model(model).float().cpu().eval()
    for m in det.modules():  # Ultralytics' export switches: plain tensor output from Detect
        if hasattr(m, "export"):
            m.export = True
        if hasattr(m, "format"):
            m.format = "onnx"
    bottleneck = bottleneck.cpu().eval()
    crossing = crossing_channels(det, cut, imgsz)
    spec = spec_for(cut, bottleneck, crossing)
    out_dir.mkdir(parents=True, exist_ok=True)
    edge, hub = SplitEdge(det, cut, bottleneck).eval(), SplitHub(det, cut, bottleneck).eval()
    paths = {role: out_dir / f"{role}.onnx" for role in SPLIT_ROLES}
    report: dict[str, Any] = {"steps": {}}
    t = time.perf_counter()
    _export(edge, torch.zeros(1, 3, *imgsz), paths["split_edge_fp32"], "images", "codes")
    report["steps"]["edge_fp32_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    _export(hub, torch.zeros(1, *spec.shape, dtype=torch.uint8), paths["split_hub"], "codes", "output0")
    report["steps"]["hub_s"] = round(time.perf_counter() - t, 2)
    quant: dict[str, Any] | None = None
    if calib_data is not None:
        from concurrent.futures import ThreadPoolExecutor

        from models.quantize import quantize_int8, select_calibration_images

        data = calib_data

        def quantize_edge() -> dict[str, Any]:
            t = time.perf_counter()
            q = quantize_int8(paths["split_edge_fp32"], paths["split_edge_int8"], data,
                              n_images=calib_images, imgsz=imgsz).to_manifest()
            report["steps"]["edge_int8_s"] = round(time.perf_counter() - t, 2)
            return q

        def quantize_hub() -> None:
            t = time.perf_counter()
            hub_fp32 = out_dir / "split_hub_fp32.onnx"
            paths["split_hub"].replace(hub_fp32)
            report["hub_quantization"] = quantize_hub_int8(hub_fp32, paths["split_hub"], paths["split_edge_fp32"],
                                                           select_calibration_images(data, calib_images),
                                                           imgsz)
            hub_fp32.unlink()
            report["steps"]["hub_int8_s"] = round(time.perf_counter() - t, 2)

        # The two calibrations are independent (the hub part's runs on the FP32 edge part's codes) and
        # neither keeps a many-core host busy: side by side (ONNX Runtime releases the GIL while it runs).
        t = time.perf_counter()
        with ThreadPoolExecutor(2, thread_name_prefix="split-int8") as pool:
            edge_job = pool.submit(quantize_edge)
            hub_job = pool.submit(quantize_hub) if hub_int8 else None
            quant = edge_job.result()
            if hub_job is not None:
                hub_job.result()
        report["steps"]["int8_s"] = round(time.perf_counter() - t, 2)
    else:
        del paths["split_edge_int8"]
    pre = preprocessing or {"letterbox": True, "pad_value": 114, "color": "RGB", "scale": "1/255", "layout": "NCHW"}
    for role, path in paths.items():
        q = quant if role == "split_edge_int8" else report.get("hub_quantization") if role == "split_hub" else None
        meta = metadata_from_manifest_fields(classes, imgsz, pre, q, version)
        meta["split"] = json.dumps({"role": role, **spec.to_dict()}, sort_keys=True)
        write_metadata(path, meta)
        report.setdefault("bytes", {})[role] = path.stat().st_size
    return paths, spec, report
