"""The page's routes over plain HTTP: what GET /, its files and /page/models answer, and their limits."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from archiver.serving.front.page_routes import PAGE_ASSETS

pytestmark = pytest.mark.slow  # the shared server loads torch models


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def test_the_page_is_small_and_names_only_its_own_files(page_server) -> None:
    origin = page_server.url()
    status, headers, html = get(origin + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    # Everything it loads is a path on this server: no scheme, no host, no CDN, no font service.
    linked = re.findall(rb'(?:src|href)="([^"]+)"', html)
    assert set(linked) == {b"/page/page.css", b"/page/app.js", b"/docs", b"/openapi.json", b"data:,"}
    assert b"http://" not in html and b"https://" not in html
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    total = len(html)
    for name, content_type in PAGE_ASSETS.items():
        status, headers, body = get(f"{origin}/page/{name}")
        assert status == 200 and headers["Content-Type"] == content_type
        # The one URL allowed is SVG's namespace name, which is never fetched.
        addresses = set(re.findall(rb"https?://[^\s\"'`)]+", body)) - {b"http://www.w3.org/2000/svg"}
        assert not addresses and b"@import" not in body, (name, addresses)
        total += len(body)
    assert total < 300_000, f"the page weighs {total} bytes"


def test_the_model_listing_says_state_batching_and_why_a_model_failed(page_server, page_models) -> None:
    status, headers, body = get(page_server.url() + "/page/models")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    models = {m["name"]: m for m in json.loads(body)["models"]}
    assert set(models) == set(page_models)
    kinds = {name: m["kind"] for name, m in models.items()}
    assert kinds == {
        "kitten_classifier": "image_classifier",
        "boxes": "object_detector",
        "squares": "image_segmenter",
        "topics": "text_classifier",
        "echo": "custom",
        "grid": "custom",
        "broken": "custom",
    }
    classifier = models["kitten_classifier"]
    assert classifier["status"] == "READY" and classifier["loadError"] is None
    described = json.loads(get(page_server.url("management") + "/models/kitten_classifier")[2])[0]
    assert (classifier["batchSize"], classifier["maxBatchDelayMs"], classifier["workers"]) == (
        described["batchSize"],
        described["maxBatchDelay"],
        described["minWorkers"],
    )
    assert classifier["liveWorkers"] == 1 and classifier["version"] == "1.0" and classifier["isDefault"]
    broken = models["broken"]
    assert broken["status"] == "FAILED" and "the weights file is for another model" in broken["loadError"]
    assert broken["handler"] == "broken.py"


def test_unknown_page_files_are_404_json(page_server) -> None:
    for path in ("/page/index.html", "/page/docs.js", "/page/..%2Fpage_routes.py", "/page/app.js.map"):
        status, headers, body = get(page_server.url() + path)
        assert status == 404, path
        assert json.loads(body)["type"] == "ResourceNotFound"
