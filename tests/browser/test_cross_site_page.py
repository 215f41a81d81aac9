"""A web page on another origin tries to drive a server that has no token, in a real headless Chromium.

The page is served by a second HTTP server on another 127.0.0.1 port, as any site the person visits
could be. Its script sends the requests a browser lets any page send without a CORS preflight: a
``no-cors`` POST registering a model from the store, a ``no-cors`` POST running a prediction, and an
HTML form posting to a model. The server refuses each (403), nothing is registered, and its own page
keeps working. The same page from an origin named in ``--allowed-origins`` does register its model, so
the refusal is the site rules' doing and not the browser's. A DNS-rebound page (its name now resolving
to 127.0.0.1, so the browser counts the server as same-origin and would let the page read the answers)
gets 403 for the Host it sends.
"""

from __future__ import annotations

import functools
import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Response, expect, sync_playwright

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
REBOUND_NAME = "rebound.example"  # a name of the attacker's that now resolves to 127.0.0.1
PNA_FEATURES = ",".join(
    (
        "BlockInsecurePrivateNetworkRequests",
        "PrivateNetworkAccessSendPreflights",
        "PrivateNetworkAccessRespectPreflightResults",
        "LocalNetworkAccessChecks",
    )
)

ATTACK_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>a page on another site</title></head>
<body>
<iframe name="sink" title="sink"></iframe>
<form id="form" method="POST" action="{inference}/predictions/echo" target="sink">
  <input name="data" value="sent by a form on another site">
</form>
<script>
  Promise.allSettled([
    fetch("{management}/models?url=victim&model_name=stolen&initial_workers=1",
          {{method: "POST", mode: "no-cors"}}),
    fetch("{inference}/predictions/echo",
          {{method: "POST", mode: "no-cors", body: "sent by a script on another site"}}),
  ]).then((results) => {{
    document.body.dataset.fetched = results.map((r) => r.status).join(",");
    document.getElementById("form").submit();
  }});
</script>
</body>
</html>
"""

# Served as if from the attacker's own address before the rebinding; its calls then reach the server
# as same-origin requests, whose answers the script could read.
REBOUND_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>a rebound page</title></head>
<body>
<script>
  (async () => {
    const listing = await fetch("/page/models");
    const predicted = await fetch("/predictions/echo", {method: "POST", body: "read me"});
    document.body.dataset.answers = JSON.stringify([
      [listing.status, await listing.text()],
      [predicted.status, await predicted.text()],
    ]);
  })();
</script>
</body>
</html>
"""


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return


@pytest.fixture
def other_site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(origin, folder): a plain file server on its own 127.0.0.1 port, another site to the browser."""
    folder = tmp_path / "site"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFiles, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium that resolves REBOUND_NAME to 127.0.0.1, as a rebinding DNS server would make it, and
    without its own Private Network Access checks: they would stop a page Chromium deems public from
    calling 127.0.0.1, but other browsers have none, so the server must hold without them."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                f"--host-resolver-rules=MAP {REBOUND_NAME} 127.0.0.1",
                f"--disable-features={PNA_FEATURES}",
            ],
        )
        yield chromium
        chromium.close()


def attack(visit: Any, other_site: tuple[str, Path], server: Any, name: str) -> dict[str, Response]:
    """Open the attack page on the other site; the server's answers to its three requests, by kind."""
    origin, folder = other_site
    page_file = folder / f"{name}.html"
    page_file.write_text(ATTACK_PAGE.format(inference=server.url(), management=server.url("management")))
    tab = visit("about:blank")
    targets = {
        "register": lambda r: "/models?url=victim" in r.url,
        "fetch": lambda r: r.url.endswith("/predictions/echo") and r.request.resource_type == "fetch",
        "form": lambda r: r.url.endswith("/predictions/echo") and r.request.resource_type == "document",
    }
    with (
        tab.page.expect_response(targets["register"]) as register,
        tab.page.expect_response(targets["fetch"]) as fetched,
        tab.page.expect_response(targets["form"]) as form,
    ):
        tab.page.goto(f"{origin}/{page_file.name}")
    # no-cors answers are opaque to the page: its promises settle either way.
    expect(tab.page.locator("body")).to_have_attribute("data-fetched", "fulfilled,fulfilled")
    # The form's request is a navigation, whose headers and answer the browser shows in full.
    assert form.value.request.header_value("origin") == origin
    return {"register": register.value, "fetch": fetched.value, "form": form.value}


def test_a_page_on_another_site_cannot_register_or_predict_and_the_servers_page_still_works(
    page_kit, page_models, visit, call_json, other_site, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    page_kit.write_archive(
        store, "victim", "echo.py", {"echo.py": (page_models["echo"] / "echo.py").read_text()}
    )
    server = page_kit.start_server(tmp_path / "cache", [page_models["echo"]], model_store=store)
    try:
        answers = attack(visit, other_site, server, "attack")
        # (a no-cors answer's body is opaque even to the browser's tools: its status is what shows)
        assert {kind: r.status for kind, r in answers.items()} == {"register": 403, "fetch": 403, "form": 403}
        assert answers["form"].json()["type"] == "CrossSiteRequestError"
        listed = call_json("GET", server.url("management") + "/models")["models"]
        assert [m["modelName"] for m in listed] == ["echo"]

        # The server's own page, in the same browser, lists the model and runs it.
        tab = visit(server.url() + "/")
        echo = tab.page.locator('article.model[data-model="echo"]')
        expect(echo).to_have_attribute("data-status", "READY", timeout=60_000)
        echo.locator("textarea").fill("from the server's own page")
        echo.locator("button.send").click()
        expect(echo.locator("pre.answer-json")).to_contain_text('"you sent": "from the server\'s own page"')
        tab.assert_stayed_home(server.url())
        tab.assert_no_script_errors()
    finally:
        server.stop()

    # The same page from an origin the operator allowed: its model is registered. So what stopped it
    # above was the server, not the browser.
    allowed = page_kit.start_server(
        tmp_path / "cache", [page_models["echo"]], model_store=store, allowed_origins=[other_site[0]]
    )
    try:
        answers = attack(visit, other_site, allowed, "allowed")
        assert answers["register"].status == 200
        assert answers["fetch"].status == 200 and answers["form"].status == 200
        listed = call_json("GET", allowed.url("management") + "/models")["models"]
        assert sorted(m["modelName"] for m in listed) == ["echo", "stolen"]
    finally:
        allowed.stop()


def test_a_dns_rebound_page_reads_nothing_and_runs_nothing(page_kit, page_models, visit, tmp_path) -> None:
    server = page_kit.start_server(tmp_path / "cache", [page_models["echo"]])
    try:
        port = server.server.ports["inference"]
        rebound = f"http://{REBOUND_NAME}:{port}"
        tab = visit("about:blank")
        # The attacker's own server answered the first visit; the name points at 127.0.0.1 after it.
        tab.page.route(
            f"{rebound}/", lambda route: route.fulfill(body=REBOUND_PAGE, content_type="text/html")
        )
        tab.page.goto(f"{rebound}/")
        answers = json.loads(tab.page.wait_for_function("document.body.dataset.answers").json_value())
        assert len(answers) == 2
        for status, text in answers:
            error = json.loads(text)
            assert status == 403 and error["type"] == "CrossSiteRequestError", text
            assert REBOUND_NAME in error["message"] and '"echo"' not in text
        # Nothing reached the model: it has answered no request at all.
        metrics = urllib.request.urlopen(server.url("metrics") + "/metrics", timeout=30).read().decode()
        assert 'model_archiver_requests_total{model="echo"' not in metrics
    finally:
        server.stop()
