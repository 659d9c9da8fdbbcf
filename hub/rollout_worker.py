"""``serve``'s rollout watcher: canaries started, judged and finished without a person (issue 6).

Every ``rollout.check_s`` seconds, with ``rollout.auto``: if no version is in canary, the newest
candidate whose gate passed (registered by a retraining job) goes to canary on
``rollout.canary_share`` of the stations; a version in canary is judged (:func:`hub.rollout.
decide_canary`) and promoted to every station or rolled back. Announcements go out retained
through :class:`hub.mqtt.RetainedPublisher`. Every action is in ``model_events`` with actor
``rollout``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hub.canary import CanaryRule
from hub.core.config import HubConfig
from hub.mqtt import RetainedPublisher
from hub.rollout import RolloutError, decide_canary, promote, rollback, start_canary
from hub.tables import ModelVersion

__all__ = ["RolloutWatcher", "check_rollouts", "rollout_cli"]

log = logging.getLogger(__name__)


def check_rollouts(config: HubConfig, sessions: sessionmaker[Session]) -> list[str]:
    """One pass; returns what was done (for logs and tests)."""
    rc = config.rollout
    assert rc is not None
    rule = CanaryRule(window_min=rc.window_min, min_samples=rc.min_samples)
    done: list[str] = []
    with sessions.begin() as s, RetainedPublisher(config.mqtt, "lineguard-hub-rollout") as pub:
        canaries = list(s.scalars(select(ModelVersion).where(ModelVersion.status == "canary")))
        for row in canaries:
            v = decide_canary(s, row.version, rule)
            if v.decision == "promote":
                n = promote(s, pub.publish, row.version, public_url=rc.public_url, actor="rollout",
                            reason="canary healthy: " + "; ".join(c["detail"] for c in v.checks))
                done.append(f"promoted {row.version} to {n} stations")
            elif v.decision == "rollback":
                n = rollback(s, pub.publish, row.version, public_url=rc.public_url, actor="rollout",
                             reason="; ".join(v.reasons))
                done.append(f"rolled back {row.version} on {n} stations: {'; '.join(v.reasons)}")
        if not canaries:
            cands = [r for r in s.scalars(select(ModelVersion).where(ModelVersion.status == "candidate")
                                          .order_by(ModelVersion.created_at.desc()))
                     if _gate_passed(r)]
            if cands:
                try:
                    chosen = start_canary(s, pub.publish, cands[0].version, public_url=rc.public_url,
                                          actor="rollout", share=rc.canary_share)
                    done.append(f"canary {cands[0].version} on {len(chosen)} stations")
                except RolloutError as e:
                    done.append(f"no canary for {cands[0].version}: {e}")
    for d in done:
        log.info("rollout: %s", d)
    return done


def _gate_passed(row: ModelVersion) -> bool:
    import json

    gate = json.loads(row.metrics_json or "{}").get("gate")
    return bool(gate and gate.get("passed"))


class RolloutWatcher:
    def __init__(self, config: HubConfig, sessions: sessionmaker[Session]) -> None:
        assert config.rollout is not None
        self.config, self.sessions = config, sessions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rollout-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        assert self.config.rollout is not None
        while not self._stop.wait(self.config.rollout.check_s):
            try:
                check_rollouts(self.config, self.sessions)
            except Exception:
                log.exception("rollout check failed; trying again in %.0f s", self.config.rollout.check_s)


def rollout_cli(args: Any, config: HubConfig) -> int:
    """``lineguard-hub rollout start|check|promote|rollback``: 0 done, 2 refused, 4 check says wait."""
    import json
    import sys

    from hub.core.db import make_engine, make_session_factory, upgrade
    from hub.registry import RegistryError
    from lineguard_contract import StationId

    rc = config.rollout
    if rc is None:
        print("lineguard-hub: rollout: the config has no rollout section (public_url)", file=sys.stderr)
        return 2
    engine = make_engine(config.db_url)
    try:
        upgrade(engine)
        sessions = make_session_factory(engine, immediate=True)
        with sessions.begin() as s, RetainedPublisher(config.mqtt, f"lineguard-hub-cli-{args.actor}"[:64]) as pub:
            v = args.version
            if args.rollout_cmd == "start":
                stations = [StationId(*x.split("/")) for x in args.stations] if args.stations else None
                chosen = start_canary(s, pub.publish, v, public_url=rc.public_url, actor=args.actor, stations=stations,
                                      share=None if stations else (args.share or rc.canary_share))
                print(f"{v}: canary on {len(chosen)} stations: " + ", ".join(f"{c.site}/{c.line}/{c.station}"
                                                                           for c in chosen))
            elif args.rollout_cmd == "check":
                verdict = decide_canary(s, v, CanaryRule(window_min=rc.window_min, min_samples=rc.min_samples))
                print(json.dumps(verdict.to_dict(), indent=1, default=str))
                if args.apply and verdict.decision == "promote":
                    promote(s, pub.publish, v, public_url=rc.public_url, actor=args.actor, reason="canary healthy")
                elif args.apply and verdict.decision == "rollback":
                    rollback(s, pub.publish, v, public_url=rc.public_url, actor=args.actor,
                             reason="; ".join(verdict.reasons))
                return 4 if verdict.decision == "wait" else 0
            elif args.rollout_cmd == "promote":
                n = promote(s, pub.publish, v, public_url=rc.public_url, actor=args.actor, reason=args.reason)
                print(f"{v}: production, announced to {n} stations")
            else:
                n = rollback(s, pub.publish, v, public_url=rc.public_url, actor=args.actor, reason=args.reason)
                print(f"{v}: rejected; production announced back to {n} stations")
        return 0
    except (RolloutError, RegistryError, ConnectionError) as e:
        print(f"lineguard-hub: {e}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
