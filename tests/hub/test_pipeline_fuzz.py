"""Property-based: whatever arrives on whatever topic, ingest answers with an outcome and never
raises; anything that is not a valid message of its topic becomes exactly one dead letter, alone
or inside a batch."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from hub.blobs import FileBlobStore
from hub.core.db import make_engine, make_session_factory, upgrade
from hub.pipeline import IngestPipeline, Outcome
from hub.tables import DeadLetter
from lineguard_contract import StationId, Topics

TOPICS = Topics()
STATION = StationId("plant1", "lineA", "st03")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IngestPipeline, Engine]]:
    d = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{d / 'hub.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    yield IngestPipeline(make_session_factory(engine), FileBlobStore(d / "blobs"), max_payload_bytes=64 * 1024), engine
    engine.dispose()


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)
sample_keys = st.sampled_from(["sample_id", "site", "line", "station", "camera", "capture_ts", "model_version",
                               "reason", "width", "height", "image", "detections", "schema_version"])
payloads = st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(sample_keys, json_values, max_size=13).map(lambda d: json.dumps(d).encode()),
)
topics = st.one_of(
    st.sampled_from([TOPICS.station(STATION, k) for k in Topics.KINDS]),
    st.text(max_size=60),
)


def _dead_letters(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(DeadLetter)).scalar_one())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=topics, payload=payloads)
def test_any_message_gets_an_outcome_and_garbage_one_dead_letter(
    pipe: tuple[IngestPipeline, Engine], topic: str, payload: bytes
) -> None:
    ingest, engine = pipe
    before = _dead_letters(engine)
    outcome = ingest.handle(topic, payload)
    assert isinstance(outcome, Outcome)
    assert _dead_letters(engine) - before == (1 if outcome is Outcome.DEAD_LETTER else 0)
    assert outcome not in (Outcome.STORED, Outcome.DUPLICATE)  # random data never passes as a sample


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(st.tuples(topics, payloads), max_size=12))
def test_a_batch_gets_one_outcome_per_message_and_garbage_one_dead_letter_each(
    pipe: tuple[IngestPipeline, Engine], messages: list[tuple[str, bytes]]
) -> None:
    ingest, engine = pipe
    before = _dead_letters(engine)
    outcomes = ingest.handle_batch(messages)
    assert len(outcomes) == len(messages) and all(isinstance(o, Outcome) for o in outcomes)
    assert _dead_letters(engine) - before == outcomes.count(Outcome.DEAD_LETTER)
    assert not {Outcome.STORED, Outcome.DUPLICATE} & set(outcomes)
