"""A file chosen on the page while its model is still LOADING: the page says it waits, sends the file once
the model is READY, exactly once, and sends nothing when the model fails, the person moves on, or ten
minutes pass. The models' initialize waits for a marker file, so each test decides when loading ends."""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Locator, expect

pytestmark = pytest.mark.slow

# initialize waits until MARKER exists (the test says when), then loads, or fails when FAILS is set.
WAITS_THEN_ECHOES = """
import os
import time

MARKER = {marker!r}
FAILS = {fails!r}


class Slow:
    def initialize(self, context):
        deadline = time.monotonic() + 100
        while not os.path.exists(MARKER) and time.monotonic() < deadline:
            time.sleep(0.05)
        if FAILS:
            raise RuntimeError("the weights file is for another model")

    def handle(self, data, context):
        answers = []
        for row in data:
            value = row.get("data", row.get("body"))
            if isinstance(value, (bytes, bytearray)):
                value = value.decode("utf-8", "replace")
            answers.append({{"you sent": value}})
        return answers
"""


def slow_archive(page_kit: Any, store: Path, name: str, marker: Path, fails: bool = False) -> Path:
    source = WAITS_THEN_ECHOES.format(marker=str(marker), fails=fails)
    return page_kit.write_archive(store, name, "slow.py", {"slow.py": source})


def register_in_background(server: Any, name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """POST /models?url=name on a thread (it answers when loading ends); the status it answered."""
    answer: dict[str, Any] = {}

    def register() -> None:
        request = urllib.request.Request(server.url("management") + f"/models?url={name}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                answer["status"] = reply.status
        except urllib.error.HTTPError as err:
            with err:
                answer["status"] = err.code

    thread = threading.Thread(target=register)
    thread.start()
    return thread, answer


def requests_answered(server: Any, model: str) -> dict[str, float]:
    """How many prediction requests for ``model`` the server answered, by status, read from /metrics."""
    with urllib.request.urlopen(server.url("metrics") + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    pattern = rf'^model_archiver_requests_total\{{model="{re.escape(model)}",status="(\d+)"\}} (\S+)$'
    return {status: float(count) for status, count in re.findall(pattern, text, re.MULTILINE)}


def predictions_sent(tab: Any, model: str) -> list[str]:
    return [r.url for r in tab.requests if f"/predictions/{model}/" in r.url]


def let_the_page_poll(tab: Any, times: int = 2) -> None:
    """Wait until the page has read the model list ``times`` more times: it had every chance to send."""
    for _ in range(times):
        tab.page.wait_for_event("request", predicate=lambda r: r.url.endswith("/page/models"))


def loading_card(tab: Any, name: str) -> Locator:
    found = tab.page.locator(f'article.model[data-model="{name}"]')
    expect(found).to_have_attribute("data-status", "LOADING")
    return found


def text_file(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_a_file_chosen_while_the_model_loads_is_sent_once_it_is_ready(
    page_kit, visit, tmp_path: Path
) -> None:
    store, marker = tmp_path / "store", tmp_path / "loaded"
    slow_archive(page_kit, store, "slow", marker)
    server = page_kit.start_server(tmp_path / "cache", model_store=store)
    registering = None
    try:
        origin = server.url()
        tab = visit(origin + "/")
        registering, registered = register_in_background(server, "slow")
        slow = loading_card(tab, "slow")
        first = text_file(tmp_path / "files", "first.txt", "the first file")
        second = text_file(tmp_path / "files", "second.txt", "the second file")

        slow.locator("input[type=file]").set_input_files(str(first))
        waiting = slow.locator(".waiting")
        expect(waiting).to_contain_text("Waiting for slow to load… first.txt is sent once it is READY.")
        # A second choice replaces the first: one wait, for the newest file.
        slow.locator("input[type=file]").set_input_files(str(second))
        expect(waiting).to_have_count(1)
        expect(waiting).to_contain_text("Waiting for slow to load… second.txt is sent once it is READY.")
        let_the_page_poll(tab)
        assert predictions_sent(tab, "slow") == []  # nothing is sent to a model that cannot answer
        tab.screenshot("page-waiting.png", slow)

        marker.touch()
        expect(slow.locator("pre.answer-json")).to_contain_text('"you sent": "the second file"')
        expect(slow).to_have_attribute("data-status", "READY")
        expect(waiting).to_have_count(0)
        registering.join(60)
        assert registered["status"] == 200

        let_the_page_poll(tab)  # more readings of a READY model do not send the file again
        assert len(predictions_sent(tab, "slow")) == 1
        assert requests_answered(server, "slow") == {"200": 1.0}
        tab.assert_stayed_home(origin)
        tab.assert_no_script_errors()
    finally:
        marker.touch()
        if registering is not None:
            registering.join(60)
        server.stop()


def test_a_model_that_fails_while_the_page_waits_is_sent_nothing(page_kit, visit, tmp_path: Path) -> None:
    """A startup model (listed LOADING as soon as the server listens) whose initialize raises."""
    marker = tmp_path / "loaded"
    doomed_archive = slow_archive(page_kit, tmp_path / "store", "doomed", marker, fails=True)
    server = page_kit.start_server(tmp_path / "cache", [doomed_archive], load_models=False)
    loading = threading.Thread(target=lambda: server.call(server.server.load_startup_models()))
    try:
        origin = server.url()
        tab = visit(origin + "/")
        loading.start()
        doomed = loading_card(tab, "doomed")
        doomed.locator("input[type=file]").set_input_files(str(text_file(tmp_path, "note.txt", "hello")))
        expect(doomed.locator(".waiting")).to_contain_text("Waiting for doomed to load…")

        marker.touch()  # initialize now raises
        expect(doomed).to_have_attribute("data-status", "FAILED")
        expect(doomed.locator(".error-wait")).to_have_text(
            "doomed failed to load, so note.txt was not sent. Why is shown above."
        )
        expect(doomed.locator(".load-error")).to_contain_text("the weights file is for another model")
        expect(doomed.locator(".waiting")).to_have_count(0)

        let_the_page_poll(tab)
        assert predictions_sent(tab, "doomed") == []
        assert requests_answered(server, "doomed") == {}
        tab.assert_stayed_home(origin)
        tab.assert_no_script_errors()
    finally:
        marker.touch()
        if loading.ident is not None:  # started
            loading.join(60)
        server.stop()


def test_a_model_whose_registration_fails_while_the_page_waits_is_sent_nothing(
    page_kit, visit, tmp_path: Path
) -> None:
    """A model registered through the management API that fails to load is not kept: its card goes."""
    store, marker = tmp_path / "store", tmp_path / "loaded"
    slow_archive(page_kit, store, "doomed", marker, fails=True)
    server = page_kit.start_server(tmp_path / "cache", model_store=store)
    registering = None
    try:
        origin = server.url()
        tab = visit(origin + "/")
        registering, registered = register_in_background(server, "doomed")
        doomed = loading_card(tab, "doomed")
        doomed.locator("input[type=file]").set_input_files(str(text_file(tmp_path, "note.txt", "hello")))
        expect(doomed.locator(".waiting")).to_contain_text("Waiting for doomed to load…")

        marker.touch()  # initialize now raises
        expect(tab.page.locator("#gone")).to_have_text(
            "doomed is no longer served (its registration failed, or it was unregistered), "
            "so note.txt was not sent."
        )
        expect(doomed).to_have_count(0)
        registering.join(60)
        assert registered["status"] >= 500

        let_the_page_poll(tab)
        assert predictions_sent(tab, "doomed") == []
        assert requests_answered(server, "doomed") == {}
        tab.assert_stayed_home(origin)
        tab.assert_no_script_errors()
    finally:
        marker.touch()
        if registering is not None:
            registering.join(60)
        server.stop()


def test_choosing_another_model_or_cancel_stops_the_wait(page_kit, visit, tmp_path: Path) -> None:
    store, marker = tmp_path / "store", tmp_path / "loaded"
    slow_archive(page_kit, store, "slow", marker)
    no_wait = tmp_path / "no-wait"
    no_wait.touch()
    ready_now = slow_archive(page_kit, tmp_path / "at-start", "quick", no_wait)
    server = page_kit.start_server(tmp_path / "cache", [ready_now], model_store=store)
    registering = None
    try:
        origin = server.url()
        tab = visit(origin + "/")
        quick = tab.page.locator('article.model[data-model="quick"]')
        expect(quick).to_have_attribute("data-status", "READY")
        registering, _ = register_in_background(server, "slow")
        slow = loading_card(tab, "slow")
        note = text_file(tmp_path / "files", "note.txt", "for the slow model")

        slow.locator("input[type=file]").set_input_files(str(note))
        expect(slow.locator(".waiting")).to_contain_text("Waiting for slow to load…")
        slow.locator(".waiting button.cancel").click()
        expect(slow.locator(".waiting")).to_have_count(0)
        expect(slow.locator(".wait-ended")).to_have_text("Stopped waiting for slow: note.txt was not sent.")

        slow.locator("input[type=file]").set_input_files(str(note))
        expect(slow.locator(".waiting")).to_contain_text("Waiting for slow to load…")
        other = text_file(tmp_path / "files", "other.txt", "for the quick model")
        quick.locator("input[type=file]").set_input_files(str(other))
        expect(quick.locator("pre.answer-json")).to_contain_text('"you sent": "for the quick model"')
        expect(slow.locator(".wait-ended")).to_have_text(
            "Stopped waiting for slow (a file was chosen for quick): note.txt was not sent."
        )
        slow.locator("input[type=file]").set_input_files(str(note))
        quick.locator("textarea").fill("typed for quick")
        quick.locator("button.send").click()
        expect(slow.locator(".wait-ended")).to_have_text(
            "Stopped waiting for slow (text was sent to quick): note.txt was not sent."
        )
        slow.locator("input[type=file]").set_input_files(str(note))
        slow.locator("textarea").fill("typed instead")
        expect(slow.locator(".wait-ended")).to_have_text(
            "Stopped waiting for slow (text was typed instead): note.txt was not sent."
        )
        slow.locator("input[type=file]").set_input_files(str(note))  # chosen again, then moved away from
        quick.locator("input[type=file]").set_input_files(str(other))
        expect(slow.locator(".wait-ended")).to_contain_text("(a file was chosen for quick)")

        marker.touch()
        expect(slow).to_have_attribute("data-status", "READY")
        let_the_page_poll(tab)
        assert predictions_sent(tab, "slow") == []
        assert requests_answered(server, "slow") == {}
        # The file is still chosen: the person may send it now with one press.
        expect(slow.locator(".choice")).to_contain_text("note.txt")
        slow.locator("button.send").click()
        expect(slow.locator("pre.answer-json")).to_contain_text('"you sent": "for the slow model"')
        tab.assert_stayed_home(origin)
        tab.assert_no_script_errors()
    finally:
        marker.touch()
        if registering is not None:
            registering.join(60)
        server.stop()


def test_the_page_stops_waiting_after_ten_minutes(page_kit, visit, tmp_path: Path) -> None:
    store, marker = tmp_path / "store", tmp_path / "loaded"
    slow_archive(page_kit, store, "slow", marker)
    server = page_kit.start_server(tmp_path / "cache", model_store=store)
    registering = None
    try:
        origin = server.url()
        tab = visit("about:blank")
        tab.page.clock.install()  # the page's timers, on a clock the test can move forward
        tab.page.goto(origin + "/")
        registering, _ = register_in_background(server, "slow")
        slow = loading_card(tab, "slow")
        slow.locator("input[type=file]").set_input_files(str(text_file(tmp_path, "note.txt", "hello")))
        expect(slow.locator(".waiting")).to_contain_text("Waiting for slow to load…")

        tab.page.clock.fast_forward("09:00")
        expect(slow.locator(".waiting")).to_contain_text("Waiting for slow to load…")
        tab.page.clock.fast_forward("01:01")
        expect(slow.locator(".error-wait")).to_have_text(
            "slow is still LOADING after 10 minutes, so note.txt was not sent. "
            "Choose it again to wait longer."
        )
        expect(slow.locator(".waiting")).to_have_count(0)

        marker.touch()
        expect(slow).to_have_attribute("data-status", "READY")
        let_the_page_poll(tab)
        assert predictions_sent(tab, "slow") == []
        assert requests_answered(server, "slow") == {}
        tab.assert_stayed_home(origin)
        tab.assert_no_script_errors()
    finally:
        marker.touch()
        if registering is not None:
            registering.join(60)
        server.stop()
