"""``lineguard-hub``: the hub's command line.

The hub (MQTT ingest, review UI, retraining, rollout) is not built yet; until it is, this
command says so and exits with status 2 rather than pretending to run.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--help"], ["-h"]):
        print("usage: lineguard-hub ... (the hub is not built yet)")
        return 0
    print("lineguard-hub: the hub is not built yet; this release ships the model tools "
          "(lineguard-model) and the edge agent's replay (lineguard-agent).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
