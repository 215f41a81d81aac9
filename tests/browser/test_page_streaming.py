"""The page shows a streaming handler's answer as it arrives, chunk by chunk, in a real headless Chromium."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.slow

# TorchServe's streaming pattern: four words, each sent half a second after the one before.
STORY = """
import time

from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    for word in ("once ", "upon ", "a "):
        send_intermediate_predict_response([word], context.request_ids, "more", 200, context)
        time.sleep(0.5)
    return ["time"]
"""


def test_the_page_shows_streamed_text_as_it_arrives(page_kit: Any, visit, tmp_path: Path) -> None:
    store = tmp_path / "models"
    model = page_kit.write_archive(store, "storyteller", "story.py", {"story.py": STORY})
    server = page_kit.start_server(tmp_path / "cache", [model])
    try:
        origin = server.url()
        tab = visit(origin + "/")
        card = tab.page.locator('article.model[data-model="storyteller"]')
        expect(card).to_have_attribute("data-status", "READY", timeout=60_000)

        card.locator("textarea").fill("tell me a story")
        card.locator("button.send").click()

        streamed = card.locator("pre.answer-stream")
        expect(streamed).to_contain_text("once", timeout=10_000)
        # seen while the handler is still writing: the last word is a good second away
        assert "time" not in streamed.inner_text()
        expect(card.locator(".stream-progress")).to_contain_text("streaming")

        expect(streamed).to_have_text("once upon a time", timeout=20_000)
        expect(card.locator(".stream-progress")).to_have_text("streamed in 4 chunks")
        latency = card.locator(".latency")
        expect(latency).to_have_text(re.compile(r"^200 OK · first chunk \d+\.\d ms · \d+\.\d ms$"))
        first, total = (float(v) for v in re.findall(r"(\d+\.\d) ms", latency.inner_text()))
        assert total - first > 1000  # three half-second pauses came after the first chunk
        assert card.locator("a.download").get_attribute("download") == "answer.txt"
        tab.assert_stayed_home(origin)
        tab.assert_no_script_errors()
    finally:
        server.stop()
