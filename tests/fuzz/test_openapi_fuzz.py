"""Requests generated from the server's own /openapi.json by schemathesis, both fitting the document and
breaking it, sent to a live server: no 5xx, JSON errors, no worker death, /ping answering throughout.

Each port hands out its own document; every operation it lists for itself is fuzzed at that port (the
metrics operation at the metrics port). Path parameters are generated, and also set to the served
models (``echo``, ``linear``; destructive operations only ever name ``spare``) so the requests reach
the handlers. ``openapi_requests.py`` generates them, derandomized (the same requests every run), in a
process of its own; four threads send them, so their order at the server varies.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

GENERATOR = Path(__file__).with_name("openapi_requests.py")
CONCURRENCY = 4  # threads sending: the server sees requests in flight together, as it does in use


def generated_requests(fuzz_server: Any) -> list[dict[str, Any]]:
    """Every generated request (label, method, url, headers, body in base64), from the generator."""
    urls = [fuzz_server.inference, fuzz_server.management, fuzz_server.metrics]
    done = subprocess.run(
        [sys.executable, str(GENERATOR), *urls], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"the generator failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def _describe(request: dict[str, Any], body: bytes) -> str:
    headers = {k: v for k, v in request["headers"].items() if k.lower() in ("content-type", "host", "origin")}
    return f"{request['method']} {request['url']} {headers} body={body[:160]!r}"


def send_all(planned: list[dict[str, Any]], watch: Any) -> None:
    """Send every request from a few threads; each answer goes to the watch."""
    local = threading.local()

    def send(request: dict[str, Any]) -> None:
        if watch.server_stuck:
            return
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        body = base64.b64decode(request["body"])
        what = f"{request['label']}: {_describe(request, body)}"
        try:
            reply = session.request(
                request["method"],
                request["url"],
                headers=request["headers"],
                data=body or None,
                timeout=15,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            watch.judge(request["label"], what, None, {}, f"{type(exc).__name__}: {exc}".encode())
            return
        watch.judge(request["label"], what, reply.status_code, reply.headers, reply.content)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(send, planned))


def test_requests_generated_from_the_servers_own_openapi_document_never_break_it(fuzz_server, watch):
    started = time.perf_counter()
    planned = generated_requests(fuzz_server)
    generated = time.perf_counter() - started
    send_all(planned, watch)
    seconds = time.perf_counter() - started
    workers = watch.worker_problems()
    print("\n" + watch.summary("OpenAPI fuzz", seconds) + f" (generating them took {generated:.1f} s)")
    for line in [*workers, *watch.ping_slow[:10], *watch.report()]:
        print("  " + line)

    assert watch.total() == len(planned), (
        f"{len(planned) - watch.total()} requests never sent: the server froze"
    )
    assert watch.total() >= 2000, f"only {watch.total()} requests: the generation lost operations"
    assert not workers, workers
    assert not watch.ping_slow, watch.ping_slow[:10]
    assert not watch.failures, f"{len(watch.failures)} failing answers, first: {watch.failures[:10]}"
