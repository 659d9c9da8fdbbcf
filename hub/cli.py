"""``lineguard-hub``: the hub's command line.

The hub's commands (serve, users, tokens) are not built yet: its database and MQTT ingest exist
as a library (``hub.ingest.IngestWorker``), its UI and API do not. Until they do, this command
says so and exits with status 2 rather than pretending to run.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--help"], ["-h"]):
        print("usage: lineguard-hub ... (the hub is not built yet)")
        return 0
    print("lineguard-hub: the hub is not built yet (its MQTT ingest exists as hub.ingest.IngestWorker; "
          "no serve command, UI or API); this release ships lineguard-model and lineguard-agent.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
