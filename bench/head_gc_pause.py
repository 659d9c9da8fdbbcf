"""How long one full collection of Python's garbage collector takes in a head process: objects
alive after loading the bundle's head, ``gc.collect(2)`` time, and the same after ``gc.freeze()``
(what ``hub.heads.quiet_collector`` does after every load). Torch heads need the ``train`` extra.

    python bench/head_gc_pause.py --runtime torch    # a GPU hub's head (CUDA when there is one)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _full_collection_ms() -> tuple[float, int]:
    """Milliseconds of one full collection and the unreachable objects it found."""
    t0 = time.perf_counter()
    found = gc.collect(2)
    return 1000 * (time.perf_counter() - t0), found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--runtime", choices=["onnx", "torch"], default="onnx")
    ap.add_argument("--device", default="cuda", help="torch runtime only (cpu without a GPU)")
    args = ap.parse_args()

    from hub.heads import load_heads

    gc.collect()
    before = len(gc.get_objects())
    load_heads([args.bundle], runtime=args.runtime, device=args.device)  # frozen by quiet_collector
    gc.unfreeze()  # as without it: the load's objects in the collector's oldest generation
    after = len(gc.get_objects())
    full, garbage = _full_collection_ms()
    gc.freeze()
    frozen, _ = _full_collection_ms()
    print(f"objects: {before:,} before the head, {after:,} after, of them {garbage:,} unreachable (cyclic "
          f"garbage of the load, which quiet_collector's freeze keeps until an unload); full collection "
          f"{full:.1f} ms, {frozen:.1f} ms after gc.freeze() ({gc.get_freeze_count():,} frozen)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
