"""A minimal agent process for test_uplink.py: an Uplink over MQTT, to be killed with SIGKILL.

``uplink_child.py fill OUTBOX PORT N [go]``: starts the uplink, stores N samples, prints each
sample id once ``send_sample`` has returned, then ``FILLED``, and waits to be killed. With
``go`` it first waits to be connected, prints ``UP`` and waits for a line on stdin; after
``FILLED`` it then prints ``SENT n`` once the uplink has handed samples to the transport.
``uplink_child.py drain OUTBOX PORT``: starts the uplink, waits until the outbox is empty,
prints the counters as JSON, stops cleanly and exits 0 (1 when it did not drain in time).
``uplink_child.py idle OUTBOX PORT``: starts the uplink, prints ``UP`` once connected, waits.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable

from edge_agent.mqtt import MqttConfig, MqttTransport
from edge_agent.outbox import SampleOutbox
from edge_agent.uplink import Uplink
from lineguard_contract import Detection, SamplePayload, StationId, new_sample_id

STATION = StationId("plant1", "lineA", "st03")
JPEG = b"\xff\xd8\xff\xe0" + bytes(2000)


def sample() -> SamplePayload:
    return SamplePayload(
        sample_id=new_sample_id(), site=STATION.site, line=STATION.line, station=STATION.station, camera="cam0",
        capture_ts=time.time(), model_version="1.0.0", reason="uncertain", width=640, height=480, image=JPEG,
        detections=[Detection(cls="dent", score=0.4, box=[1.0, 2.0, 30.0, 40.0])],
    )


def wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def main() -> int:
    mode, outbox_path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    transport = MqttTransport(MqttConfig(client_id="agent-st03", host="127.0.0.1", port=port, keepalive_s=2,
                                         reconnect_min_s=1, reconnect_max_s=2))
    uplink = Uplink(transport, SampleOutbox(outbox_path), STATION, agent_id="agent-st03", model_version="1.0.0")
    uplink.start()
    if mode == "fill":
        go = sys.argv[5:] == ["go"]
        if go:
            wait(lambda: uplink.counters().connected)
            print("UP", flush=True)
            sys.stdin.readline()
        for _ in range(int(sys.argv[4])):
            s = sample()
            uplink.send_sample(s)
            print(s.sample_id, flush=True)
        print("FILLED", flush=True)
        if go:
            wait(lambda: uplink.counters().sent >= uplink.max_inflight)
            print(f"SENT {uplink.counters().sent}", flush=True)
        time.sleep(600)
    elif mode == "drain":
        drained = uplink.wait_drained(timeout=30)
        print(json.dumps(dataclasses.asdict(uplink.counters())), flush=True)
        uplink.stop()
        return 0 if drained else 1
    elif mode == "idle":
        wait(lambda: uplink.counters().connected)
        print("UP", flush=True)
        time.sleep(600)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
