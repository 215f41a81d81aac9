"""A v1 call's instances are queued all together or not at all, even when several calls arrive at
once: the room is checked and taken in one step, so two calls cannot both pass the check and then
be queued in part (issue 19, item 5: "none queued")."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from archiver.errors import ServiceUnavailableError
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor.batcher import Batcher
from archiver.serving.supervisor.registry import ModelSettings
from tests.serving.conftest import http

JSON = {"Content-Type": "application/json"}

# Writes each request it runs to a log, one line each, before acting on it; "sleep:S" works S seconds.
RECORDING_HANDLER = """
import json
import socket
import time

LOG = {log!r}


def handle(data, context):
    if not data:
        return None
    answers = []
    for row in data:
        value = row.get("data", row.get("body"))
        text = value.decode() if isinstance(value, (bytes, bytearray)) else json.dumps(value)
        with open(LOG, "a") as log:
            log.write(text + "\\n")
        if text.startswith("sleep:"):
            time.sleep(float(text.split(":")[1]))
        answers.append(text)
    return answers
"""


def _v1_request(instances: list[str]) -> bytes:
    body = json.dumps({"instances": instances}).encode()
    head = "POST /v1/models/rec:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _read_reply(conn: socket.socket) -> bytes:
    """One small answer on a kept-alive connection (its head and a body that came with it)."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        data += conn.recv(65536)
    return data


def _read_all(conn: socket.socket) -> bytes:
    with conn:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def test_concurrent_v1_calls_are_queued_whole_or_not_at_all(serve, make_model, tmp_path, poll):
    log = tmp_path / "ran.log"
    model = make_model("rec", handler_source=RECORDING_HANDLER.format(log=str(log)))
    server = serve([model], defaults=ModelSettings(queue_size=10, batch_size=1))
    url = server.url()
    statuses: list[int] = []
    for round_ in range(3):
        # the only worker busy for a while, so the queue's 10 places are all there is
        busy = threading.Thread(target=http, args=("POST", url + "/predictions/rec", b"sleep:1.5"))
        busy.start()
        poll(lambda: log.exists() and log.read_text().splitlines()[-1:] == ["sleep:1.5"], what="worker busy")
        # eight connections open first, then all eight requests sent at once: the front reads them in
        # the same turn of its event loop, the case where checking the room and queueing apart raced
        port = int(url.rsplit(":", 1)[1])
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        for conn in conns:  # each connection accepted and waiting for its next request
            conn.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b'"Healthy"' in _read_reply(conn)
        requests = [_v1_request([f"r{round_}c{n}i{i}" for i in range(6)]) for n in range(8)]
        for conn, request in zip(conns, requests, strict=True):
            conn.sendall(request)
        replies = [int(_read_all(conn).split(b" ", 2)[1]) for conn in conns]
        busy.join()
        # queued after everything else: answered once every queued instance has run
        assert http("POST", url + "/predictions/rec", f"end{round_}".encode()).status == 200
        statuses += replies
        ran = [line for line in log.read_text().splitlines() if line.startswith(f'"r{round_}c')]
        calls_run = {line.split("i")[0] for line in ran}
        # only whole calls ran, and exactly those answered 200 (6 of 10 places: one call at a time)
        assert len(ran) == 6 * replies.count(200), (replies, ran)
        assert len(calls_run) == replies.count(200) == 1, (replies, ran)
        assert sorted(replies) == [200] + [503] * 7


def test_a_batcher_takes_all_of_a_calls_requests_or_none():
    async def story() -> None:
        batcher = Batcher("m", queue_size=10)
        part = [("data", b"x", "text/plain")]
        rows = [RawRequest(request_id=str(i), headers={}, parts=part) for i in range(6)]
        first = asyncio.ensure_future(batcher.submit_all(rows))
        second = asyncio.ensure_future(batcher.submit_all(rows))
        await asyncio.sleep(0)  # both started in the same turn of the loop
        assert batcher.pending == 6
        with pytest.raises(ServiceUnavailableError, match="room for 4 more requests and this one has 6"):
            await second
        jobs = await batcher.take()
        batcher.deliver(jobs, [InferenceResponse(body=b"ok") for _ in jobs])
        first.cancel()

    asyncio.run(story())
