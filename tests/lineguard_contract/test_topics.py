import re

import pytest

from lineguard_contract import Topics
from lineguard_contract.topics import StationId


@pytest.mark.parametrize(
    ("sid", "kind", "expected"),
    [
        (StationId("plant1", "lineA", "st03"), "samples", "lineguard/v1/plant1/lineA/st03/samples"),
        (StationId("city", "x-12", "cam.7"), "status", "lineguard/v1/city/x-12/cam.7/status"),
    ],
)
def test_station_topic_round_trip(sid: StationId, kind: str, expected: str) -> None:
    topics = Topics()
    assert topics.station(sid, kind) == expected
    assert topics.parse(expected) == (sid, kind)


@pytest.mark.parametrize(
    ("site", "error"),
    [("a/b", "site='a/b'"), ("+", "site='+'"), ("", "site=''"), ("#", "site='#'")],
)
def test_wildcards_and_separators_are_refused(site: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        StationId(site, "l", "s")


@pytest.mark.parametrize(
    "topic",
    ["lineguard/v2/a/b/c/samples", "lineguard/v1/a/b/samples", "lineguard/v1/a/b/c/other", "x"],
)
def test_parse_refuses_foreign_topics(topic: str) -> None:
    with pytest.raises(ValueError, match="is not a lineguard/v1 station topic"):
        Topics().parse(topic)


def test_subscription_filter_matches_station_topics() -> None:
    t = Topics()
    assert t.all_stations("samples") == "lineguard/v1/+/+/+/samples"
    with pytest.raises(ValueError, match="unknown topic kind"):
        t.all_stations("nope")
