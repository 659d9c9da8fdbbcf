"""Where one training iteration of the retraining job goes: the shipped model (YOLOv8n at 960 px)
forward + loss + backward + AdamW step under AMP, on synthetic GPU-resident batches (no data
loader), per batch size, with deterministic algorithms or not, eager or ``torch.compile``d (the
forward only, as Ultralytics' ``compile=`` does), channels_last as Ultralytics trains on CUDA.
``--profile`` adds the GPU-kernel time per iteration from the torch profiler: an iteration that
takes much longer than its kernels is bound by the host (Python and kernel launches), not the GPU.

    python bench/train_step.py --device 0 --json docs/results/train_step_h100.json
    python bench/train_step.py --device 0 --batch 16 --compile default --json docs/results/train_step_compile_h100.json

Needs the ``train`` extra. Times from a CPU run only show that the script works.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _model(torch: Any, device: Any) -> Any:
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    m = YOLO(str(ROOT / "models" / "default" / "checkpoint.pt")).model.to(device).float()
    m.args = get_cfg(DEFAULT_CFG)  # the loss's hyperparameters, as the trainer sets them
    for p in m.parameters():
        p.requires_grad_(True)
    m.train()
    return m.to(memory_format=torch.channels_last) if device.type == "cuda" else m


def _batch(torch: Any, device: Any, n: int, size: int, gen: Any) -> dict[str, Any]:
    """``n`` random frames with 6 boxes each (normalized xywh, as the trainer's batches carry them)."""
    boxes = 6 * n
    xy = torch.rand(boxes, 2, device=device, generator=gen) * 0.3 + 0.32
    wh = torch.rand(boxes, 2, device=device, generator=gen) * 0.3 + 0.02
    return {"img": torch.rand(n, 3, size, size, device=device, generator=gen),
            "batch_idx": torch.arange(n, device=device).repeat_interleave(6).float(),
            "cls": torch.randint(0, 4, (boxes, 1), device=device, generator=gen).float(),
            "bboxes": torch.cat([xy, wh], 1)}


def measure(batch: int, *, deterministic: bool, compile_mode: str | None, device_name: str, size: int,
            iters: int, profile: bool, backend: str = "inductor") -> dict[str, Any]:
    import torch

    device = torch.device(f"cuda:{device_name}" if device_name.isdigit() else device_name)
    cuda = device.type == "cuda"
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    model = _model(torch, device)
    if backend != "inductor":  # another backend takes no mode
        net = torch.compile(model, backend=backend, dynamic=False)
    else:
        net = torch.compile(model, mode=compile_mode) if compile_mode else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    batches = [_batch(torch, device, batch, size, gen) for _ in range(3)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(b: dict[str, Any]) -> None:
        if backend == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
        img = b["img"].contiguous(memory_format=torch.channels_last) if cuda else b["img"]
        with torch.autocast(device.type, enabled=cuda):
            loss, _ = model.loss(b, net(img))
        scaler.scale(loss.sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    t0 = time.perf_counter()
    step(batches[0])
    sync()
    first = time.perf_counter() - t0
    for i in range(5):
        step(batches[i % 3])
    times = []
    for i in range(iters):
        sync()
        t0 = time.perf_counter()
        step(batches[i % 3])
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    res: dict[str, Any] = {"batch": batch, "deterministic": deterministic, "compile": compile_mode, "backend": backend,
                           "first_iteration_s": round(first, 2),
                           "iteration_ms_median": round(1000 * times[len(times) // 2], 1),
                           "ms_per_image": round(1000 * times[len(times) // 2] / batch, 2)}
    if profile and cuda:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        n = 10
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(n):
                step(batches[i % 3])
            sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        res["gpu_kernel_ms_per_iteration"] = round(sum(e.device_time for e in kernels) / 1000 / n, 1)
        res["kernels_per_iteration"] = len(kernels) // n
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="0", help="0 for the first GPU, or cpu")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default 16, 32, 64)")
    p.add_argument("--imgsz", type=int, default=960)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--compile", default=None, help="torch.compile mode of the forward (default: eager)")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend: inductor (with --compile MODE) or cudagraphs (CUDA graphs of the "
                        "forward and backward, no code generation)")
    p.add_argument("--deterministic-only", action="store_true", help="only deterministic algorithms (as the job)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from models.offline import configure_offline, patch_ultralytics

    configure_offline()
    patch_ultralytics()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    modes = (True,) if args.deterministic_only else (True, False)
    plan = [(b, det) for b in (args.batch or [16, 32, 64]) for det in modes]
    runs = [measure(b, deterministic=det, compile_mode=args.compile, device_name=args.device, size=args.imgsz,
                    iters=args.iters, profile=not args.no_profile, backend=args.backend)
            for b, det in tqdm(plan, desc="train step", unit="run", file=sys.stderr)]
    import torch

    emit_json({"runs": runs, "imgsz": args.imgsz, "device": (torch.cuda.get_device_name(0)
                                                              if args.device.isdigit() else args.device),
               "machine": platform.node(), "torch": torch.__version__,
               "date": datetime.now(UTC).strftime("%Y-%m-%d")}, args.json)


if __name__ == "__main__":
    main()
