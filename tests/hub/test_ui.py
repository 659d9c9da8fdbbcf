"""The review UI in a real browser: headless Debian Chromium driven by Playwright
(``executable_path``; no browser download), against the real app served by uvicorn on a free
port, on SQLite and (with TEST_DATABASE_URL) PostgreSQL. Screenshots are saved under
``out/test-artifacts/`` (or ``$LINEGUARD_TEST_ARTIFACTS``) as test artefacts."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hub.api import HubContext, create_app
from hub.tables import Review, Sample
from lineguard_contract import Detection, SamplePayload
from tests.hub.conftest import live_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("LINEGUARD_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "out" / "test-artifacts"))
PASSWORD = "correct horse battery"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium; "
                                                         ".ci/run installs it)")


def frame_jpeg(seed: int) -> bytes:
    import cv2
    import numpy as np

    img = np.full((360, 640, 3), 90 + 10 * seed, np.uint8)
    cv2.rectangle(img, (120, 80), (520, 300), (170, 170, 170), -1)  # a part
    cv2.line(img, (200, 150), (300, 190), (30, 30, 30), 3)  # a scratch
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return bytes(buf.tobytes())


@dataclass
class LiveHub:
    base: str
    sessions: Any
    samples: list[SamplePayload]


@pytest.fixture
def live_hub(hub_store: Any, sample_factory: Callable[..., SamplePayload]) -> Iterator[LiveHub]:
    box = [195.0, 140.0, 305.0, 200.0]
    samples = hub_store.ingest([sample_factory(seed=i, width=640, height=360, image=frame_jpeg(i),
                                               detections=[Detection(cls="scratch", score=0.8 - i / 10, box=box)])
                                for i in range(3)])
    hub_store.add_users(PASSWORD, rita="reviewer", vera="viewer")
    sessions = hub_store.sessions
    app = create_app(HubContext(hub_store.config, sessions, hub_store.blobs))
    with live_app(app) as url:
        yield LiveHub(url, sessions, samples)


@pytest.fixture
def browser_page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        browser.close()
        assert errors == [], f"JavaScript errors: {errors}"


def login(page: Any, base: str, user: str) -> None:
    page.goto(f"{base}/queue")
    assert "/login" in page.url
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/queue")


def review_rows(hub: LiveHub) -> list[tuple[str, str, str, int]]:
    with hub.sessions() as s:
        rows = s.execute(select(Sample.sample_id, Sample.status, Review.username, Review.boxes_json)
                         .join(Review, Review.sample_pk == Sample.id).order_by(Review.id)).all()
    import json

    return [(sid, status, user, len(json.loads(boxes))) for sid, status, user, boxes in rows]


def test_login_queue_review_confirm_in_chromium(live_hub: LiveHub, browser_page: Any) -> None:
    page, base = browser_page, live_hub.base
    login(page, base, "rita")
    rows = page.locator("table.queue tbody tr")
    assert rows.count() == 3
    newest = live_hub.samples[-1]  # the queue is newest first
    assert rows.first.get_attribute("data-sample") == newest.sample_id
    rows.first.locator("a").first.click()
    page.wait_for_url(f"{base}/samples/{newest.sample_id}*")
    page.wait_for_function("document.getElementById('img').complete")
    assert page.locator("#boxes li").count() == 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "review_page.png"), full_page=True)
    page.locator("#frame").focus()
    page.keyboard.press("c")  # confirm: stored, then on to the next sample in the queue
    page.wait_for_url(f"{base}/samples/{live_hub.samples[1].sample_id}*")
    assert review_rows(live_hub) == [(newest.sample_id, "confirmed", "rita", 1)]
    page.goto(f"{base}/samples/{newest.sample_id}")
    assert "rita" in page.locator("#history").inner_text()
    assert page.locator("#status").inner_text() == "confirmed"


def test_draw_a_missed_box_and_reject_with_the_keyboard(live_hub: LiveHub, browser_page: Any) -> None:
    page, base = browser_page, live_hub.base
    login(page, base, "rita")
    target = live_hub.samples[0]
    page.goto(f"{base}/samples/{target.sample_id}")
    page.wait_for_function("document.getElementById('img').complete")
    canvas = page.locator("#frame")
    canvas.focus()
    box = canvas.bounding_box()
    page.keyboard.press("d")
    scale = box["width"] / 640
    page.mouse.move(box["x"] + 400 * scale, box["y"] + 220 * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + 480 * scale, box["y"] + 290 * scale, steps=5)
    page.mouse.up()
    assert page.locator("#boxes li").count() == 2
    drawn = page.evaluate("window.lineguardReview.boxes()[1].box")
    assert drawn == pytest.approx([400, 220, 480, 290], abs=3)
    page.screenshot(path=str(ARTIFACTS / "review_drawn_box.png"), full_page=True)
    page.keyboard.press("c")
    page.wait_for_url(f"{base}/queue*")  # the oldest sample: next is the queue
    assert review_rows(live_hub) == [(target.sample_id, "confirmed", "rita", 2)]
    page.goto(f"{base}/samples/{live_hub.samples[1].sample_id}")
    page.locator("#frame").focus()
    page.keyboard.press("r")
    page.wait_for_url(f"{base}/samples/{target.sample_id}*")
    assert review_rows(live_hub)[-1] == (live_hub.samples[1].sample_id, "rejected", "rita", 0)


def test_a_viewer_sees_the_frame_but_cannot_review(live_hub: LiveHub, browser_page: Any) -> None:
    page, base = browser_page, live_hub.base
    login(page, base, "vera")
    page.goto(f"{base}/samples/{live_hub.samples[0].sample_id}")
    assert page.locator("#review-form").count() == 0
    page.locator("#frame").focus()
    page.keyboard.press("c")
    time.sleep(0.3)
    assert review_rows(live_hub) == []
