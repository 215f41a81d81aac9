"""SECURITY.md's list of the routes open without the token is exactly the server's own.

The OpenAPI document marks each operation that needs no token (``security: []``), and
test_openapi.py's ``test_the_token_is_asked_exactly_where_the_document_says`` holds a live server to
it; this test holds SECURITY.md to the document, so a route opened in the code and not in the page
(or the other way round) fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from archiver.serving.front.openapi import openapi_document

SECURITY_MD = Path(__file__).resolve().parents[2] / "SECURITY.md"


def routes_in_the_page() -> set[tuple[str, str, str]]:
    """(port, method, path) for each route SECURITY.md's "Routes open without the token" table lists."""
    text = SECURITY_MD.read_text()
    section = text.split("### Routes open without the token", 1)[1].split("\n#", 1)[0]
    listed = set()
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        ports = [p.strip() for p in cells[0].split(",")]
        for route in re.findall(r"`([^`]+)`", cells[1]):
            method, _, path = route.rpartition(" ")
            for port in ports:
                listed.add((port, (method or "GET").lower(), path))
    return listed


def routes_in_the_document() -> set[tuple[str, str, str]]:
    """(port, method, path) for each operation the OpenAPI document serves without the token."""
    found = set()
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            if operation.get("security") != []:
                continue
            paths = [path]
            for param in operation.get("parameters", []):  # a path over a fixed set of files
                paths = [
                    p.replace("{" + param["name"] + "}", v) for p in paths for v in param["schema"]["enum"]
                ]
            found |= {(port, method, p) for port in operation["x-ports"] for p in paths}
    return found


def test_security_md_lists_exactly_the_routes_open_without_the_token():
    listed, served = routes_in_the_page(), routes_in_the_document()
    assert listed, "SECURITY.md lists no open route"
    assert listed == served, f"only in SECURITY.md: {listed - served}; only in the server: {served - listed}"
