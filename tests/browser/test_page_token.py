"""A server with a token: the page and its files load without it, the page asks for it, keeps it in the
tab's session storage only, and sends it with every call it makes; a new tab asks again."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.slow

TOKEN = "tab-only-9f2c"
STORAGE_KEY = "model-archiver-token"


def test_the_page_asks_for_the_token_and_keeps_it_in_the_tab(page_kit, page_models, visit, tmp_path: Path):
    server = page_kit.start_server(tmp_path / "cache", [page_models["echo"]], token=TOKEN)
    try:
        origin = server.url()
        tab = visit(origin + "/")
        page = tab.page
        expect(page.locator("#token")).to_be_visible()
        expect(page.locator("#notice")).to_contain_text("Enter the server's token")
        assert TOKEN not in page.content()

        page.fill("#token-input", "not-the-token")
        page.click("#token-form button[type=submit]")
        expect(page.locator("#token-message")).to_have_text("That token was refused.")
        expect(page.locator("article.model")).to_have_count(0)

        page.fill("#token-input", TOKEN)
        page.click("#token-form button[type=submit]")
        echo = page.locator('article.model[data-model="echo"]')
        expect(echo).to_have_attribute("data-status", "READY")
        echo.locator("textarea").fill("with the token")
        echo.locator("button.send").click()
        expect(echo.locator("pre.answer-json")).to_contain_text("with the token")

        # Kept in this tab's session storage, nowhere else; never written into the page.
        assert page.evaluate(f"sessionStorage.getItem('{STORAGE_KEY}')") == TOKEN
        assert page.evaluate("localStorage.length") == 0
        assert page.context.cookies() == []
        assert TOKEN not in page.content()
        # The page and its files came without the token; the calls after it was given carried it.
        sent = {}
        for request in tab.requests:
            path = request.url[len(origin) :]
            sent.setdefault(path, []).append(request.all_headers().get("authorization"))
        files = ("/page/app.js", "/page/dom.js", "/page/draw.js", "/page/inputs.js", "/page/page.css")
        for path in ("/", *files):
            assert sent[path] == [None], path
        assert sent["/predictions/echo/1.0"] == [f"Bearer {TOKEN}"]
        assert sent["/page/models"][0] is None and sent["/page/models"][-1] == f"Bearer {TOKEN}"

        # A reload of the same tab remembers it; a new tab has its own session and asks again.
        page.reload()
        expect(page.locator('article.model[data-model="echo"]')).to_have_attribute("data-status", "READY")
        other = visit(origin + "/")
        expect(other.page.locator("#token")).to_be_visible()
        expect(other.page.locator("article.model")).to_have_count(0)
        assert other.page.evaluate(f"sessionStorage.getItem('{STORAGE_KEY}')") is None

        page.click("#token-forget")
        assert page.evaluate(f"sessionStorage.getItem('{STORAGE_KEY}')") is None
        for visited in (tab, other):
            visited.assert_stayed_home(origin)
            visited.assert_no_script_errors(expected_statuses=(401,))
    finally:
        server.stop()
