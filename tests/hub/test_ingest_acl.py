"""The ingest worker under the deployed broker security: Mosquitto with a password file and
deploy/mosquitto/acl, the hub's own account, its shared subscription, and a station's account
publishing its samples. Also: a station cannot pose as the hub."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.core.config import HubConfig
from hub.core.db import make_engine
from hub.ingest import IngestWorker
from hub.tables import Sample
from lineguard_contract import SamplePayload, Topics, encode

REPO = Path(__file__).resolve().parents[2]
TOPICS = Topics()
pytestmark = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")


def _publisher(port: int, user: str, password: str) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}")
    c.username_pw_set(user, password)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    return c


def _stored(config: HubConfig) -> int:
    engine = make_engine(config.db_url)
    try:
        with Session(engine) as s:
            return int(s.scalar(select(func.count()).select_from(Sample)) or 0)
    finally:
        engine.dispose()


@pytest.mark.parametrize("hub_user,hub_password,expect_stored", [
    ("lineguard-hub", "hub-pw", True),
    ("plant1-lineA-st04", "st04-pw", False),  # a station's account may not read other stations
])
def test_worker_ingests_through_the_deploy_acl(mosquitto_factory: Any, hub_config: Callable[..., HubConfig],
                                               sample_factory: Callable[..., SamplePayload], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, hub_user: str, hub_password: str,
                                               expect_stored: bool) -> None:
    passwd = tmp_path / "passwd"
    users = {"lineguard-hub": "hub-pw", "plant1-lineA-st03": "st03-pw", "plant1-lineA-st04": "st04-pw"}
    for i, (user, pw) in enumerate(users.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, pw], check=True)
    broker = mosquitto_factory(f"allow_anonymous false\npassword_file {passwd}\n"
                               f"acl_file {REPO / 'deploy/mosquitto/acl'}\n")
    monkeypatch.setenv("LINEGUARD_HUB_MQTT_PASSWORD", hub_password)
    config = hub_config(broker.port, mqtt={"url": f"mqtt://127.0.0.1:{broker.port}", "username": hub_user})
    worker = IngestWorker(config, client_id="hub-acl")
    worker.start()
    try:
        assert worker.wait_subscribed(10)  # mosquitto 3.1.1 grants a denied subscription; reads are filtered
        pub = _publisher(broker.port, "plant1-lineA-st03", "st03-pw")
        sample = sample_factory(seed=1)
        pub.publish(TOPICS.station(sample.station_id, "samples"), encode(sample), qos=1).wait_for_publish(10)
        deadline = time.monotonic() + (10 if expect_stored else 2)
        while _stored(config) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _stored(config) == (1 if expect_stored else 0)
        pub.disconnect()
        pub.loop_stop()
    finally:
        worker.stop()
