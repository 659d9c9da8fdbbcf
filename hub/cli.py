"""``lineguard-hub``: the hub's command line.

    lineguard-hub serve [-c hub.yaml] [--data-dir DIR] [--http-port N] [--mqtt-port M] [--broker URL] [--database URL]
    lineguard-hub user add NAME --role viewer|reviewer|admin --password-stdin
    lineguard-hub user passwd NAME --password-stdin
    lineguard-hub token create NAME [--user USER]
    lineguard-hub export OUT_DIR [--classes a,b,c]
    lineguard-hub migrate

Every command reads the same configuration (``-c``, then flags). Exit status: 0 on success,
2 for a bad configuration or bad arguments, 1 when the work failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hub.core.config import ConfigError, HubConfig, build_config, load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lineguard-hub", description="LineGuard hub: ingest, review UI, REST API.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, help="hub YAML config (see deploy/hub/hub.yaml)")
    common.add_argument("--data-dir", type=Path, help="database (SQLite default), blobs and broker state")
    common.add_argument("--database", help="SQLAlchemy URL, e.g. postgresql://user@host/db")
    common.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", parents=[common], help="run broker (embedded unless --broker), ingest, UI and API")
    s.add_argument("--http-host", help="default 127.0.0.1")
    s.add_argument("--http-port", type=int)
    s.add_argument("--mqtt-port", type=int, help="port of the embedded broker (default 1883)")
    s.add_argument("--broker", help="mqtt://host:port or mqtts://host:port of an external broker")

    h = sub.add_parser("heads", parents=[common], help="run only the split head service (scale out: one per core "
                                                      "group or machine; needs a heads section and an external broker)")
    h.add_argument("--broker", help="mqtt://host:port or mqtts://host:port of the broker")
    h.add_argument("--client-id", help="MQTT client id (default <group>-<host>-<pid>)")

    mo = sub.add_parser("models", help="the model registry").add_subparsers(dest="models_cmd", required=True)
    mo.add_parser("list", parents=[common], help="every registered version with its status")
    mr = mo.add_parser("register", parents=[common], help="add a bundle as a candidate (or the first production)")
    mr.add_argument("bundle", type=Path)
    mr.add_argument("--production", action="store_true", help="the hub's first model")
    mr.add_argument("--actor", default="cli")
    for verb, what in (("promote", "make a version production (the current one is retired)"),
                       ("canary", "start a candidate's canary"), ("reject", "reject a candidate or canary")):
        mp = mo.add_parser(verb, parents=[common], help=what)
        mp.add_argument("version")
        mp.add_argument("--actor", default="cli")
        mp.add_argument("--reason", default="")

    u = sub.add_parser("user", help="accounts").add_subparsers(dest="user_cmd", required=True)
    ua = u.add_parser("add", parents=[common], help="create a user")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=["viewer", "reviewer", "admin"])
    ua.add_argument("--password-stdin", action="store_true", required=True, help="read the password from stdin")
    up = u.add_parser("passwd", parents=[common], help="set a user's password (ends their sessions)")
    up.add_argument("name")
    up.add_argument("--password-stdin", action="store_true", required=True)

    t = sub.add_parser("token", help="API tokens").add_subparsers(dest="token_cmd", required=True)
    tc = t.add_parser("create", parents=[common], help="create a token; printed once")
    tc.add_argument("name")
    tc.add_argument("--user", help="the user the token acts as (default: the only admin, if one)")

    e = sub.add_parser("export", parents=[common], help="reviewed samples as an Ultralytics YOLO dataset")
    e.add_argument("out", type=Path)
    e.add_argument("--classes", help="comma-separated class order (the model's); others follow")
    e.add_argument("--val-share", type=float, default=0.2)

    sub.add_parser("migrate", parents=[common], help="upgrade the database schema to the latest revision")
    ro = sub.add_parser("rollout", help="over-the-air: canary, verdict, promote, rollback (needs a rollout section)"
                        ).add_subparsers(dest="rollout_cmd", required=True)
    rs = ro.add_parser("start", parents=[common], help="send a candidate to canary stations")
    rs.add_argument("version")
    grp = rs.add_mutually_exclusive_group()
    grp.add_argument("--share", type=float, help="share of stations (default rollout.canary_share)")
    grp.add_argument("--stations", nargs="+", metavar="SITE/LINE/STATION")
    rc = ro.add_parser("check", parents=[common], help="compare canary and control health; --apply acts on it")
    rc.add_argument("version")
    rc.add_argument("--apply", action="store_true", help="promote or roll back as the verdict says")
    for verb, what in (("promote", "make a version production and announce it to every station"),
                       ("rollback", "reject a canary and announce production back (pinned) to its stations")):
        rp = ro.add_parser(verb, parents=[common], help=what)
        rp.add_argument("version")
        rp.add_argument("--reason", default="manual")
    for p_ in (rs, rc, *[ro.choices[v] for v in ("promote", "rollback")]):
        p_.add_argument("--actor", default="cli")
    r = sub.add_parser("retrain", parents=[common],
                       help="retrain on the reviewed samples now (or resume a job a crash left): train, gate, sign, "
                            "register; exit 0 candidate registered, 3 the gate refused it, 1 failed, 2 busy")
    r.add_argument("--trigger", default="manual", choices=["manual", "schedule"], help=argparse.SUPPRESS)
    r.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    r.add_argument("--by", default="cli", help="who asked (recorded with the job)")
    return p


def _config(args: argparse.Namespace) -> HubConfig:
    data: dict[str, Any] = {}
    if args.config:
        data = load_config(args.config).model_dump(exclude_unset=True, mode="json")
    if args.data_dir:
        data["data_dir"] = str(args.data_dir)
    if args.database:
        data["database_url"] = args.database
    if getattr(args, "http_host", None):
        data.setdefault("http", {})["host"] = args.http_host
    if getattr(args, "http_port", None):
        data.setdefault("http", {})["port"] = args.http_port
    if getattr(args, "broker", None):
        data.setdefault("mqtt", {})["url"] = args.broker
    elif getattr(args, "mqtt_port", None):
        data.setdefault("mqtt", {})["url"] = f"mqtt://127.0.0.1:{args.mqtt_port}"
        data.setdefault("embedded_broker", True)
    return build_config(data, origin=str(args.config or "command line"))


def _read_password() -> str:
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def _with_db(config: HubConfig, fn: Callable[..., int]) -> int:
    from hub.accounts import AccountError
    from hub.core.db import make_engine, make_session_factory, upgrade

    engine = make_engine(config.db_url)
    try:
        upgrade(engine)
        with make_session_factory(engine)() as s:
            return fn(s)
    except (AccountError, FileExistsError) as e:  # the user's mistake: say it, exit 2
        print(f"lineguard-hub: {e}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def _models(s: Any, args: argparse.Namespace) -> int:
    from hub import registry

    try:
        if args.models_cmd == "list":
            for m in registry.list_versions(s):
                print(f"{m.version:<12} {m.status:<10} parent {m.parent_version or '-':<10} "
                      f"created {m.created_at:%Y-%m-%d %H:%M} by {m.created_by}"
                      + (f", promoted by {m.promoted_by}" if m.promoted_by else ""))
            return 0
        if args.models_cmd == "register":
            m = registry.register(s, args.bundle, actor=args.actor,
                                  status="production" if args.production else "candidate")
        else:
            status = {"promote": "production", "canary": "canary", "reject": "rejected"}[args.models_cmd]
            m = registry.set_status(s, args.version, status, actor=args.actor, reason=args.reason)
        s.commit()
    except (registry.RegistryError, ValueError) as e:
        print(f"lineguard-hub: {e}", file=sys.stderr)
        return 2
    print(f"{m.version}: {m.status}")
    return 0


def _run_until_signal(worker: Any) -> int:
    """Block until SIGINT/SIGTERM, then stop ``worker``; exit 0."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("LineGuard head service running; Ctrl-C stops it", flush=True)
    stop.wait()
    worker.stop()
    return 0


def _retrain(args: argparse.Namespace, config: HubConfig) -> int:
    if config.retrain is None:
        print("lineguard-hub: retrain: the config has no retrain section (golden set, replay data, key)",
              file=sys.stderr)
        return 2
    from hub.retrain import RetrainBusy
    from hub.retrain_worker import run_retrain

    try:
        st = run_retrain(config, trigger=args.trigger, requested_by=args.by, progress=not args.no_progress)
    except RetrainBusy as e:
        print(f"lineguard-hub: {e}", file=sys.stderr)
        return 2
    summary = (f"job {st.job_id}: {st.status}; candidate {st.candidate_version or '-'} "
               f"(production {st.production_version or '-'})")
    if st.status == "failed":
        print(f"lineguard-hub: {summary}: {st.error}", file=sys.stderr)
        return 1
    print(summary + ("" if st.gate_passed else "; gate: " + "; ".join(st.gate_reasons)))
    return 0 if st.status == "succeeded" else 3


def _run(args: argparse.Namespace, config: HubConfig) -> int:
    from hub.accounts import AccountError, create_token, create_user, set_password

    if args.cmd == "serve":
        from hub.server import serve

        return serve(config, log_level="debug" if args.verbose else "info")
    if args.cmd == "heads":
        if config.heads is None:
            print("lineguard-hub: heads: the config has no heads section (bundles to serve)", file=sys.stderr)
            return 2
        from hub.server import start_heads

        return _run_until_signal(start_heads(config, client_id=args.client_id))
    if args.cmd == "migrate":
        return _with_db(config, lambda s: 0)
    if args.cmd == "user":
        password = _read_password()

        def user(s: Any) -> int:
            if args.user_cmd == "add":
                create_user(s, args.name, password, args.role)
            else:
                set_password(s, args.name, password)
            s.commit()
            print(f"user {args.name}: {'created' if args.user_cmd == 'add' else 'password set'}")
            return 0

        return _with_db(config, user)
    if args.cmd == "token":
        def token(s: Any) -> int:
            from sqlalchemy import select

            from hub.tables import User

            name = args.user
            if name is None:
                admins = list(s.scalars(select(User.username).where(User.role == "admin")))
                if len(admins) != 1:
                    raise AccountError(f"--user is needed ({len(admins)} admins)")
                name = admins[0]
            secret = create_token(s, name, args.name)
            s.commit()
            print(secret)
            print(f"token {args.name!r} acts as {name}; shown once, keep it safe", file=sys.stderr)
            return 0

        return _with_db(config, token)
    if args.cmd == "models":
        return _with_db(config, lambda s: _models(s, args))
    if args.cmd == "retrain":
        return _retrain(args, config)
    if args.cmd == "rollout":
        from hub.rollout_worker import rollout_cli

        return rollout_cli(args, config)
    if args.cmd == "export":
        from hub.blobs import FileBlobStore
        from hub.export import export_dir

        classes = [c for c in args.classes.split(",") if c] if args.classes else None

        def export(s: Any) -> int:
            st = export_dir(s, FileBlobStore(config.blob_dir), args.out, classes, args.val_share)
            print(f"exported {st.train} train + {st.val} val images ({st.boxes} boxes, {st.negatives} negatives) "
                  f"to {args.out}")
            return 0

        return _with_db(config, export)
    raise AssertionError(args.cmd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = _config(args)
    except ConfigError as e:
        print(f"lineguard-hub: {e}", file=sys.stderr)
        return 2
    return _run(args, config)


if __name__ == "__main__":
    raise SystemExit(main())
