"""INT8 static post-training quantization of an exported YOLO detector (onnxruntime only, no torch).

Recipe (see docs of :func:`quantize_int8`):

* ``quant_pre_process`` first (symbolic + ONNX shape inference, basic ORT graph optimisation); a
  failure there is logged and the un-preprocessed model is quantized instead.
* QDQ format, per-channel symmetric INT8 weights, asymmetric UINT8 activations (U8S8: the
  layout ORT's x86 VNNI kernels are built for; measured against S8S8 in the PR notes).
* Calibrated on ``N`` letterboxed frames drawn deterministically from a dataset's train split,
  preprocessed exactly like inference (:func:`models.processing.preprocess_batch`).
* The detection head's decoding stays in float: everything downstream of the last Conv of each
  Detect branch (the DFL Reshape/Transpose/Softmax/Conv, the anchor/stride Sub/Add/Div/Mul, the
  class Sigmoid and the Concats that build ``output0``). Quantizing that tail is the classic
  cause of collapsed box coordinates and class scores (onnxruntime issues #14233, #10787, #9598).
  The tail is found from the graph's structure, walking back from the model output, not from
  hard-coded node names; the Detect layer's index is read off the node names it reaches
  (:func:`models.head_tail.find_head_tail`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from models.head_tail import HeadTail, find_head_tail
from models.processing import preprocess_batch

__all__ = [
    "CALIBRATION_BATCH",
    "DEFAULT_ACTIVATION_TYPE",
    "DEFAULT_CALIBRATION_METHOD",
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_REDUCE_RANGE",
    "DEFAULT_WEIGHT_TYPE",
    "QuantizationError",
    "QuantizationReport",
    "calibration_batches",
    "list_dataset_images",
    "load_frames",
    "quantize_int8",
    "select_calibration_images",
    # re-exported from models.head_tail, where they live now, for existing importers
    "HeadTail",
    "find_head_tail",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_CALIBRATION_IMAGES = 200
#: U8S8 = uint8 activations x int8 weights, the fastest INT8 path of ONNX Runtime on x86 and ARM.
DEFAULT_ACTIVATION_TYPE = "QUInt8"
DEFAULT_WEIGHT_TYPE = "QInt8"
#: 7-bit weights. On x86 CPUs without VNNI (AVX2 only, as this project's 2-core AMD EPYC build
#: machine) ONNX Runtime's U8S8 kernels use VPMADDUBSW, whose 16-bit intermediate sums saturate;
#: measured on the default model (200 val images): full-range U8S8 mAP50 0.826 vs FP32 0.954,
#: reduce_range 0.949 (57 ms/frame), U8U8 0.955 (72 ms; FP32 79 ms). With VNNI (AVX-512 VNNI,
#: AVX-VNNI) or on ARM there is no saturation and the 7th bit costs little. A bundle must run
#: right on every agent CPU, so reduce_range is the default.
DEFAULT_REDUCE_RANGE = True
#: Chosen by :func:`models.quant_error.compare_calibration_methods` on the random-init dev model; re-check on the
#: trained checkpoint (activation ranges of a trained net differ a lot from a random-init one).
DEFAULT_CALIBRATION_METHOD = "minmax"
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.999

EXCLUDED_REASON = (
    "YOLO Detect head decoding kept in float: DFL softmax/conv, anchor/stride arithmetic, class "
    "sigmoid and output concats (everything after the last Conv of each Detect branch); INT8 "
    "there collapses box coordinates/scores (onnxruntime issues 14233, 10787, 9598)."
)


class QuantizationError(RuntimeError):
    """Quantization could not produce a usable INT8 model."""


@dataclass
class QuantizationReport:
    """What :func:`quantize_int8` did; ``to_manifest()`` is the bundle manifest's ``quantization``."""

    method: str
    format: str
    per_channel: bool
    activation_type: str
    weight_type: str
    reduce_range: bool
    calibration_method: str
    calibration_images: int
    calibration_source: str
    detect_layer: str
    excluded_nodes: list[str]
    excluded_reason: str
    branch_convs: list[str]  # last Conv of each Detect branch: quantized, the float tail's boundary
    preprocessed: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)
    deltas: dict[str, Any] = field(default_factory=dict)

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration"] = {
            "images": d.pop("calibration_images"),
            "source": d.pop("calibration_source"),
            "method": d.pop("calibration_method"),
        }
        if self.calibration_method == "percentile":
            d["calibration"]["percentile"] = PERCENTILE
        return d


# --------------------------------------------------------------------------- calibration data


def list_dataset_images(dataset_dir: str | Path, split: str = "train") -> list[Path]:
    """Images of a YOLO-layout dataset split (``DIR/images/SPLIT``), sorted by relative path.

    ``dataset_dir`` may also point straight at a folder of images.
    """
    root = Path(dataset_dir)
    folder = root / "images" / split
    if not folder.is_dir():
        folder = root
    if not folder.is_dir():
        raise QuantizationError(f"calibration source {root} is not a directory")
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise QuantizationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def select_calibration_images(
    dataset_dir: str | Path, n: int = DEFAULT_CALIBRATION_IMAGES, split: str = "train", seed: int = 0
) -> list[Path]:
    """``n`` images drawn deterministically (fixed seed over the sorted file list)."""
    files = list_dataset_images(dataset_dir, split)
    if n >= len(files):
        return files
    idx = np.sort(np.random.default_rng(seed).choice(len(files), size=n, replace=False))
    return [files[i] for i in idx]


def load_frames(paths: Iterable[str | Path]) -> list[np.ndarray]:
    import cv2

    frames = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise QuantizationError(f"cannot read calibration image {p}")
        frames.append(img)
    return frames


#: frames per calibration batch. The calibrating session runs unoptimised with every activation as
#: an output; one frame per run left a many-core host idle (a 16-core host calibrated no faster than
#: 2 cores). MinMax ranges (min of mins, max of maxes) do not depend on how the frames are batched.
CALIBRATION_BATCH = 8


def calibration_batches(paths: Sequence[Path], imgsz: tuple[int, int],
                        batch: int = CALIBRATION_BATCH) -> Iterator[np.ndarray]:
    """Letterboxed NCHW float batches of up to ``batch`` frames of ``paths``, in order."""
    for i in range(0, len(paths), batch):
        out, _ = preprocess_batch(load_frames(paths[i : i + batch]), imgsz)
        yield out


def _calibration_reader(input_name: str, paths: Sequence[Path], imgsz: tuple[int, int], batch: int = 1):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Streams ``batch`` letterboxed frames at a time (calibration memory stays flat). MinMax only:
        the histogram calibrators stack every run's arrays and need one shape."""

        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._it = calibration_batches(paths, imgsz, batch)

    return _Reader()


# --------------------------------------------------------------------------- model input


def _input_spec(model_path: Path) -> tuple[str, tuple[int, int]]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    h, w = inp.shape[2], inp.shape[3]
    if not (isinstance(h, int) and isinstance(w, int)):
        raise QuantizationError(
            f"{model_path}: input {inp.name} has dynamic spatial dims {inp.shape}; pass imgsz"
        )
    return inp.name, (h, w)


# --------------------------------------------------------------------------- quantization


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    try:
        return getattr(QuantType, name)
    except AttributeError:
        raise QuantizationError(f"unknown quant type {name!r} (QUInt8 or QInt8)") from None


def _calib_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if name not in table:
        raise QuantizationError(f"unknown calibration method {name!r}; one of {sorted(table)}")
    return table[name]


def _preprocess(src: Path, dst: Path, warnings: list[str]) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # A batch-dynamic YOLO graph trips the strict symbolic inference ("Incomplete symbolic shape
    # inference"); auto_merge resolves it. Fall back to ONNX-only shape inference, then to nothing.
    attempts = ({"auto_merge": True}, {"skip_symbolic_shape": True})
    errors = []
    for kwargs in attempts:
        try:
            quant_pre_process(str(src), str(dst), **kwargs)
            return dst
        except Exception as e:  # noqa: BLE001 - any failure here only costs some optimisation
            errors.append(f"{kwargs}: {type(e).__name__}: {e}")
    msg = f"quant_pre_process failed ({'; '.join(errors)}); quantizing the model as exported"
    log.warning(msg)
    warnings.append(msg)
    return src


def _entropy_ranges(model: Path, reader: Any, cache: Path, tmp: Path, num_bins: int = 2048) -> None:
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    cal = create_calibrator(
        model,
        None,
        augmented_model_path=str(tmp / "augmented_entropy.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": num_bins, "num_quantized_bins": 128},
    )
    cal.collect_data(reader)
    save_tensors_data(cal.compute_data(), cache)


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calib_source: str | Path | Sequence[str | Path],
    *,
    n_images: int = DEFAULT_CALIBRATION_IMAGES,
    imgsz: tuple[int, int] | None = None,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    activation_type: str = DEFAULT_ACTIVATION_TYPE,
    weight_type: str = DEFAULT_WEIGHT_TYPE,
    per_channel: bool = True,
    reduce_range: bool = DEFAULT_REDUCE_RANGE,
    exclude_head: bool = True,
    float_branch_convs: bool = False,
    op_types: Sequence[str] | None = None,
    calibration_cache: str | Path | None = None,
    split: str = "train",
) -> QuantizationReport:
    """Static INT8 (QDQ) quantization of ``fp32_path`` into ``out_path``.

    ``calib_source`` is a YOLO-layout dataset dir (its ``images/<split>`` is sampled), a folder
    of images, or an explicit list of image paths. ``calibration_cache`` (a JSON path) reuses
    tensor ranges across runs with the same model/method/images. ``float_branch_convs`` also
    keeps the six branch-final 1x1 convs in float (their outputs are the raw box/class logits).
    """
    from onnxruntime.quantization import QuantFormat, quantize_static

    t0 = time.perf_counter()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    warnings: list[str] = []
    if isinstance(calib_source, (str, Path)):
        paths = select_calibration_images(calib_source, n_images, split=split)
        source = str(calib_source)
    else:
        paths = [Path(p) for p in calib_source][:n_images]
        source = "explicit list"
        if not paths:
            raise QuantizationError("empty calibration image list")
    if len(paths) < n_images:
        warnings.append(f"only {len(paths)} calibration images available (asked for {n_images})")
        log.warning(warnings[-1])
    input_name, model_hw = _input_spec(fp32_path)
    # tuple(): callers may pass a list (e.g. from JSON / argparse)
    imgsz = cast("tuple[int, int]", tuple(imgsz)) if imgsz else model_hw

    extra: dict[str, Any] = {}
    if calibration_method == "percentile":
        extra["CalibPercentile"] = PERCENTILE

    with tempfile.TemporaryDirectory(prefix="lg_quant_") as tmp:
        pre = _preprocess(fp32_path, Path(tmp) / "pre.onnx", warnings)
        tail = find_head_tail(pre)
        excluded = list(tail.nodes) if exclude_head else []
        if float_branch_convs:  # also keep the last Conv of each Detect branch in float
            excluded += list(tail.branch_convs)
        cache = str(calibration_cache) if calibration_cache else None
        from models.calibration import minmax_ranges, use_threaded_minmax

        if calibration_method == "minmax" and use_threaded_minmax() and not (cache and Path(cache).is_file()):
            # ONNX Runtime's MinMax reduces every tensor in the graph, one thread each: reduce in threads
            cache = cache or str(Path(tmp) / "minmax_ranges.json")
            feeds = ({input_name: b} for b in calibration_batches(paths, imgsz, CALIBRATION_BATCH))
            minmax_ranges(pre, feeds, Path(cache), op_types=op_types)
        if calibration_method == "entropy" and not (cache and Path(cache).is_file()):
            # quantize_static cannot pass num_bins to the entropy calibrator and its default
            # (128 bins for 128 quantized bins) leaves one candidate threshold: the full range,
            # i.e. MinMax. Calibrate here with a finer histogram and hand the ranges over.
            cache = cache or str(Path(tmp) / "entropy_ranges.json")
            _entropy_ranges(pre, _calibration_reader(input_name, paths, imgsz), Path(cache), Path(tmp))
        tmp_out = out_path.with_name(out_path.name + ".tmp")
        try:
            quantize_static(
                str(pre),
                str(tmp_out),
                _calibration_reader(input_name, paths, imgsz,
                                    batch=CALIBRATION_BATCH if calibration_method == "minmax" else 1),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=_qtype(activation_type),
                weight_type=_qtype(weight_type),
                nodes_to_exclude=excluded,
                op_types_to_quantize=list(op_types) if op_types else None,
                calibrate_method=_calib_method(calibration_method),
                extra_options=extra,
                **({"calibration_cache_path": cache} if cache else {}),
            )
            tmp_out.replace(out_path)
        finally:
            tmp_out.unlink(missing_ok=True)

    return QuantizationReport(
        method="static",
        format="QDQ",
        per_channel=per_channel,
        activation_type=activation_type,
        weight_type=weight_type,
        reduce_range=reduce_range,
        calibration_method=calibration_method,
        calibration_images=len(paths),
        calibration_source=source,
        detect_layer=tail.detect_layer,
        excluded_nodes=excluded,
        excluded_reason=EXCLUDED_REASON if exclude_head else "none excluded",
        branch_convs=list(tail.branch_convs),
        preprocessed=not any("quant_pre_process" in w for w in warnings),
        seconds=round(time.perf_counter() - t0, 2),
        warnings=warnings,
    )
