"""The page at GET / on the inference port, in a real headless Chromium: a person picks a file or types
text for each model and sees its answer drawn; nothing leaves the server's address; no script fails."""

from __future__ import annotations

import base64
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Locator, Page, expect

pytestmark = pytest.mark.slow

KITTEN_SIZE = (451, 300)  # tests/data/kitten.jpg, width x height


def card(page: Page, model: str) -> Locator:
    return page.locator(f'article.model[data-model="{model}"]')


def ready_card(page: Page, model: str) -> Locator:
    found = card(page, model)
    expect(found).to_have_attribute("data-status", "READY", timeout=60_000)
    return found


def box_of(locator: Locator) -> dict[str, float]:
    box = locator.bounding_box()
    assert box is not None, "element is not displayed"
    return box


def test_an_image_classifier_shows_the_cat_labels_as_bars(page_server, visit, kitten_path: Path) -> None:
    origin = page_server.url()
    tab = visit(origin + "/")
    classifier = ready_card(tab.page, "kitten_classifier")
    expect(classifier.locator(".meta")).to_contain_text("batch size 1")

    classifier.locator("input[type=file]").set_input_files(str(kitten_path))

    bars = classifier.locator(".bars .bar")
    expect(bars).to_have_count(5)
    labels = bars.locator(".bar-label").all_inner_texts()
    assert labels == ["Egyptian cat", "tabby", "tiger cat", "lynx", "Persian cat"]
    values = [float(v) for v in bars.evaluate_all("rows => rows.map(r => r.dataset.value)")]
    assert values == sorted(values, reverse=True) and 0.5 < values[0] < 1 and sum(values) <= 1.0
    # Each bar is as long as its probability: the first fills that share of its track.
    fill, track = box_of(bars.first.locator(".bar-fill")), box_of(bars.first.locator(".bar-track"))
    assert fill["width"] / track["width"] == pytest.approx(values[0], abs=0.02)
    assert bars.first.locator(".bar-value").inner_text() == f"{values[0] * 100:.1f}%"
    expect(classifier.locator(".latency")).to_have_text(re.compile(r"^200 OK · \d+\.\d ms$"))
    photo = classifier.locator("img.photo")
    expect(photo).to_be_visible()
    assert photo.evaluate("img => [img.naturalWidth, img.naturalHeight]") == list(KITTEN_SIZE)

    tab.screenshot("page-all.png")
    shot = tab.screenshot("page-classifier.png", classifier)
    assert shot.stat().st_size < 200_000
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors()


def test_a_detectors_boxes_are_drawn_over_the_photo(page_server, visit, kitten_path: Path) -> None:
    origin = page_server.url()
    tab = visit(origin + "/")
    detector = ready_card(tab.page, "boxes")
    detector.locator("input[type=file]").set_input_files(str(kitten_path))

    boxes = detector.locator("svg.boxes g.box")
    expect(boxes).to_have_count(2)  # the third box scores 0.2, under the handler's 0.5 threshold
    assert boxes.evaluate_all("gs => gs.map(g => g.dataset.label)") == ["cat", "remote"]
    assert boxes.locator("text").all_text_contents() == ["cat 93.0%", "remote 61.0%"]
    w, h = KITTEN_SIZE
    overlay = detector.locator("svg.boxes")
    assert overlay.get_attribute("viewBox") == f"0 0 {w} {h}"
    # The overlay covers the photo exactly, so the cat box sits where the model put it on the photo.
    photo, drawn = box_of(detector.locator("img.photo")), box_of(overlay)
    for key in ("x", "y", "width", "height"):
        assert drawn[key] == pytest.approx(photo[key], abs=1)
    cat = box_of(boxes.first.locator("rect"))
    scale = photo["width"] / w
    assert cat["x"] == pytest.approx(photo["x"] + 0.2 * w * scale, abs=3)
    assert cat["y"] == pytest.approx(photo["y"] + 0.1 * h * scale, abs=3)
    assert cat["width"] == pytest.approx(0.6 * w * scale, abs=4)
    expect(detector.locator(".detections li")).to_have_count(2)

    tab.screenshot("page-detector.png", detector)
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors()


def test_a_segmenters_mask_is_drawn_over_the_photo(page_server, visit, kitten_path: Path) -> None:
    origin = page_server.url()
    tab = visit(origin + "/")
    segmenter = ready_card(tab.page, "squares")
    with tab.page.expect_response(re.compile(r"/predictions/squares/")) as answer:
        segmenter.locator("input[type=file]").set_input_files(str(kitten_path))
    # The page asks for the compact PNG mask rather than 224x224x2 numbers of JSON.
    assert answer.value.headers["content-type"] == "image/png"
    assert "image/png" in answer.value.request.headers["accept"]

    mask = segmenter.locator("canvas.mask")
    expect(mask).to_be_visible()
    assert mask.evaluate("c => [c.width, c.height]") == [224, 224]
    # Drawn pixels: class 1 in the middle and class 2 in the corner are coloured, background is clear.
    pixels = mask.evaluate(
        """c => { const d = c.getContext("2d");
                  const at = (x, y) => Array.from(d.getImageData(x, y, 1, 1).data);
                  return { middle: at(112, 112), corner: at(5, 5), edge: at(200, 112) }; }"""
    )
    assert pixels["middle"][3] > 0 and pixels["corner"][3] > 0
    assert pixels["middle"][:3] != pixels["corner"][:3]
    assert pixels["edge"][3] == 0
    # The mask covers the centred square the handler's Resize(256) + CenterCrop(224) looked at.
    w, h = KITTEN_SIZE
    photo, drawn = box_of(segmenter.locator("img.photo")), box_of(mask)
    scale = photo["width"] / w
    side = min(w, h) * 224 / 256
    assert drawn["width"] == pytest.approx(side * scale, abs=2)
    assert drawn["height"] == pytest.approx(side * scale, abs=2)
    assert drawn["x"] == pytest.approx(photo["x"] + (w - side) / 2 * scale, abs=2)
    assert drawn["y"] == pytest.approx(photo["y"] + (h - side) / 2 * scale, abs=2)
    legend = segmenter.locator(".legend li")
    assert legend.evaluate_all("items => items.map(i => i.dataset.class)") == ["0", "1", "2"]

    tab.screenshot("page-segmenter.png", segmenter)
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors()


def test_a_json_class_map_from_any_handler_is_drawn_as_a_mask(page_server, visit, kitten_path: Path) -> None:
    origin = page_server.url()
    tab = visit(origin + "/")
    grid = ready_card(tab.page, "grid")
    grid.locator("input[type=file]").set_input_files(str(kitten_path))
    mask = grid.locator("canvas.mask")
    expect(mask).to_be_visible()
    assert mask.evaluate("c => [c.width, c.height]") == [6, 4]
    left, right = mask.evaluate(
        """c => [Array.from(c.getContext("2d").getImageData(0, 0, 1, 1).data),
                 Array.from(c.getContext("2d").getImageData(5, 3, 1, 1).data)]"""
    )
    assert left[3] > 0 and right[3] == 0
    # A handler of its own: its mask is laid over the whole photo.
    photo, drawn = box_of(grid.locator("img.photo")), box_of(mask)
    for key in ("x", "y", "width", "height"):
        assert drawn[key] == pytest.approx(photo[key], abs=1)
    assert grid.locator("a.download").get_attribute("download") == "answer.json"
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors()


def test_a_text_classifiers_labels_are_bars(page_server, visit) -> None:
    origin = page_server.url()
    tab = visit(origin + "/")
    topics = ready_card(tab.page, "topics")
    topics.locator("textarea").fill("What a goal! The match went to extra time after a football frenzy.")
    topics.locator("button.send").click()

    bars = topics.locator(".bars .bar")
    expect(bars).to_have_count(3)
    assert bars.locator(".bar-label").all_inner_texts()[0] == "sports"
    assert sorted(bars.locator(".bar-label").all_inner_texts()) == ["cooking", "sports", "weather"]
    expect(topics.locator("img.photo")).to_have_count(0)
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors()


def test_any_other_answer_is_shown_as_json_with_a_download(page_server, visit, tmp_path: Path) -> None:
    origin = page_server.url()
    tab = visit(origin + "/")
    echo = ready_card(tab.page, "echo")
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"question": "what is in the photo?"}))
    echo.locator("input[type=file]").set_input_files(str(notes))

    shown = echo.locator("pre.answer-json")
    expect(shown).to_be_visible()
    answer = json.loads(shown.inner_text())
    assert answer == {
        "you sent": {"question": "what is in the photo?"},
        "kind": "dict",
        "words": answer["words"],
    }
    link = echo.locator("a.download")
    assert link.get_attribute("download") == "answer.json"
    with tab.page.expect_download() as saved:
        link.click()
    assert json.loads(Path(saved.value.path()).read_text()) == answer

    echo.locator("textarea").fill("plain words here")
    echo.locator("button.send").click()
    expect(echo.locator("pre.answer-json")).to_contain_text('"you sent": "plain words here"')

    # A handler of the archive's own is sent any file, as bytes.
    raw = tmp_path / "tensor.bin"
    raw.write_bytes(b"raw bytes")
    with tab.page.expect_request(re.compile(r"/predictions/echo/")) as request:
        echo.locator("input[type=file]").set_input_files(str(raw))
    assert request.value.headers["content-type"] == "application/octet-stream"
    expect(echo.locator("pre.answer-json")).to_contain_text('"you sent": "raw bytes"')
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors()


def test_an_unsupported_file_gets_a_readable_message(page_server, visit, tmp_path: Path) -> None:
    origin = page_server.url()
    tab = visit(origin + "/")
    classifier = ready_card(tab.page, "kitten_classifier")
    archive = tmp_path / "weights.zip"
    archive.write_bytes(b"PK\x03\x04" + bytes(200))
    sent: list[str] = []
    tab.page.on("request", lambda r: sent.append(r.url) if "/predictions/" in r.url else None)

    classifier.locator("input[type=file]").set_input_files(str(archive))
    message = classifier.locator(".error-unsupported")
    expect(message).to_have_text(
        "kitten_classifier (image classifier) reads images; weights.zip is a file of type application/zip. "
        f"Send other files with curl -T FILE {origin}/predictions/kitten_classifier"
    )
    assert sent == []  # refused in the page, nothing sent

    text = tmp_path / "caption.txt"
    text.write_text("a cat on a sofa")
    classifier.locator("input[type=file]").set_input_files(str(text))
    expect(classifier.locator(".error-unsupported")).to_contain_text(
        "kitten_classifier (image classifier) reads images; caption.txt is text."
    )

    # A file that claims to be a JPEG but is not one: the handler's own one-line reason is shown.
    fake = tmp_path / "broken.jpg"
    fake.write_bytes(b"this is not a picture at all")
    classifier.locator("input[type=file]").set_input_files(str(fake))
    server_says = classifier.locator(".error-server")
    expect(server_says).to_have_text(re.compile(r"^400: HandlerInputError: not an image PIL can read"))
    assert "Traceback" not in server_says.inner_text()
    assert len(sent) == 1
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors(expected_statuses=(400,))


def test_a_model_that_failed_to_load_says_why(page_server, visit) -> None:
    origin = page_server.url()
    tab = visit(origin + "/")
    broken = card(tab.page, "broken")
    expect(broken).to_have_attribute("data-status", "FAILED")
    expect(broken.locator(".status")).to_have_text("FAILED")
    expect(broken.locator(".load-error")).to_contain_text("the weights file is for another model")
    expect(broken.locator(".state")).to_contain_text("FAILED: it cannot answer")
    expect(broken.locator("input[type=file]")).to_be_hidden()
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors()


def test_a_loading_model_says_so_and_becomes_ready(page_kit, visit, call_json, tmp_path: Path) -> None:
    """A model registered while the page is open shows LOADING, then READY, without a reload."""
    store = tmp_path / "store"
    marker = tmp_path / "loaded"
    page_kit.write_archive(
        store, "slow", "slow.py", {"slow.py": page_kit.WAITS_FOR_FILE.format(marker=str(marker))}
    )
    server = page_kit.start_server(tmp_path / "cache", model_store=store)
    try:
        origin = server.url()
        tab = visit(origin + "/")
        expect(tab.page.locator("#notice")).to_contain_text("No models are served")
        registered: dict[str, Any] = {}
        register = threading.Thread(
            target=lambda: registered.update(call_json("POST", server.url("management") + "/models?url=slow"))
        )
        register.start()
        slow = card(tab.page, "slow")  # the page reads the list every few seconds: no reload needed
        expect(slow).to_have_attribute("data-status", "LOADING")
        expect(slow.locator(".state")).to_contain_text("LOADING")
        expect(slow.locator("button.send")).to_be_disabled()
        marker.touch()
        expect(slow).to_have_attribute("data-status", "READY")
        register.join(60)
        assert registered["status"].startswith('Model "slow" Version: 1.0 registered')
        slow.locator("textarea").fill("hello")
        expect(slow.locator("button.send")).to_be_enabled()
        slow.locator("button.send").click()
        expect(slow.locator("pre.answer-json")).to_contain_text('"ready": true')
        tab.assert_stayed_home(origin)
        tab.assert_no_script_errors()
    finally:
        server.stop()


def test_the_api_docs_render_offline(page_server, visit) -> None:
    origin = page_server.url()
    tab = visit(origin + "/docs")
    expect(tab.page.locator(".swagger-ui .info .title")).to_contain_text("model-archiver serve")
    expect(tab.page.locator(".opblock-summary-path", has_text="/predictions/{model}").first).to_be_visible()
    # Try a request from the page: it goes to this origin and the answer is shown.
    ping = tab.page.locator(".opblock-get", has=tab.page.locator('[data-path="/ping"]'))
    ping.locator(".opblock-summary").click()
    ping.locator("button.try-out__btn").click()
    ping.locator("button.execute").click()
    expect(ping.locator(".live-responses-table tbody td.response-col_status").first).to_have_text("200")
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors()


def test_a_dropped_photo_is_sent_like_a_picked_one(page_server, visit, kitten_bytes: bytes) -> None:
    origin = page_server.url()
    tab = visit(origin + "/")
    topics, classifier = ready_card(tab.page, "topics"), ready_card(tab.page, "kitten_classifier")
    dropped = tab.page.evaluate_handle(
        """b64 => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    const transfer = new DataTransfer();
                    transfer.items.add(new File([bytes], "kitten.jpg", { type: "image/jpeg" }));
                    return transfer; }""",
        base64.b64encode(kitten_bytes).decode(),
    )
    topics.locator(".drop").dispatch_event("drop", {"dataTransfer": dropped})
    expect(topics.locator(".error-unsupported")).to_contain_text(
        "topics (text classifier) reads text; kitten.jpg is an image."
    )
    classifier.locator(".drop").dispatch_event("drop", {"dataTransfer": dropped})
    expect(classifier.locator(".bars .bar").first.locator(".bar-label")).to_have_text("Egyptian cat")
    tab.assert_stayed_home(origin)
    tab.assert_no_script_errors()
