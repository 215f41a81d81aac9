"""The inference port's fast lane (front/fast_lane.py): plain predictions are answered without aiohttp's
objects, and a client cannot tell, except by the speed. Every request the lane does not take (another
route, a chunked or multipart body, a head it will not read) reaches aiohttp from its first byte, on the
same connection, and meets aiohttp's strict parser and the server's limits as before."""

from __future__ import annotations

import json
import socket
import time

import pytest

from archiver.serving.supervisor.registry import ModelSettings
from tests.serving.test_streaming import GENERATOR_HANDLER

PLAIN = (
    b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n%b"
)


def plain(text: bytes, extra: bytes = b"") -> bytes:
    head = PLAIN.replace(b"Content-Type", extra + b"Content-Type") if extra else PLAIN
    return head % (len(text), text)


class Conn:
    """A bare keep-alive connection that reads whole answers (Content-Length or chunked)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.data = b""

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.data += chunk
        return bool(chunk)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.data:
            if not self._fill():
                raise ConnectionError("closed before an answer")
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.data:
                    self._fill()
                size_line, _, self.data = self.data.partition(b"\r\n")
                size = int(size_line, 16)
                while len(self.data) < size + 2:
                    self._fill()
                body, self.data = body + self.data[:size], self.data[size + 2 :]
                if size == 0:
                    return int(status.split()[1]), headers, body
        length = int(headers.get("content-length", "0"))
        while len(self.data) < length:
            if not self._fill():
                raise ConnectionError("closed mid-answer")
        body, self.data = self.data[:length], self.data[length:]
        return int(status.split()[1]), headers, body

    def closed(self, within: float = 5) -> bool:
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, ConnectionError):
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def lanes(monkeypatch, serve, echo_model):
    """Start a server with the lane on (``"lane"``) or off (``"aiohttp"``); returns its inference port."""

    def start(which: str, **settings) -> int:
        monkeypatch.setenv("MODEL_ARCHIVER_FAST_LANE", "1" if which == "lane" else "0")
        server = serve([echo_model], **settings).server
        assert (server.lane is not None) == (which == "lane")
        started.append(server)
        return server.ports["inference"]

    started: list = []
    start.servers = started  # type: ignore[attr-defined]

    return start


def test_both_lanes_answer_a_prediction_alike(lanes):
    answers = {}
    for which in ("lane", "aiohttp"):
        conn = Conn(lanes(which))
        conn.send(plain(b"hello", b"X-Request-ID: rid-1\r\n"))
        answers[which] = conn.answer()
        conn.send(plain(b"bad input"))  # the handler's 400 for one row
        answers[which + " 400"] = conn.answer()
        conn.close()
    for suffix in ("", " 400"):
        (s1, h1, b1), (s2, h2, b2) = answers["lane" + suffix], answers["aiohttp" + suffix]
        assert s1 == s2 and b1 == b2
        assert set(h1) == set(h2), (h1, h2)
        for name in ("content-type", "content-length", "server", "x-request-id"):
            assert h1.get(name) == h2.get(name) or name == "x-request-id" and suffix, name
    status, headers, body = answers["lane"]
    assert status == 200 and json.loads(body)["echo"] == "hello" and headers["x-request-id"] == "rid-1"
    lane = lanes.servers[0].lane
    assert (lane.taken, lane.handed) == (2, 0)  # both answered in the lane, neither by aiohttp


def test_keep_alive_and_pipelined_requests_are_answered_in_order(lanes):
    conn = Conn(lanes("lane"))
    conn.send(b"".join(plain(b"one-%d" % i) for i in range(5)))  # five requests in one write
    assert [json.loads(conn.answer()[2])["echo"] for _ in range(5)] == [f"one-{i}" for i in range(5)]
    for i in range(3):  # and then one at a time on the same connection
        conn.send(plain(b"two-%d" % i))
        assert json.loads(conn.answer()[2])["echo"] == f"two-{i}"
    conn.close()
    assert lanes.servers[0].lane.taken == 8


def test_a_request_the_lane_does_not_take_goes_to_aiohttp_on_the_same_connection(lanes):
    conn = Conn(lanes("lane"))
    conn.send(plain(b"first"))
    assert conn.answer()[0] == 200
    # a GET, then a chunked body, then a plain prediction again: aiohttp has the connection from the GET
    conn.send(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, _, body = conn.answer()
    assert status == 200 and json.loads(body)["status"] == "Healthy"
    conn.send(
        b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n"
    )
    status, _, body = conn.answer()
    assert status == 200 and json.loads(body)["echo"] == "chunked"
    conn.send(plain(b"after"))
    assert json.loads(conn.answer()[2])["echo"] == "after"
    conn.close()
    lane = lanes.servers[0].lane
    assert (lane.taken, lane.handed) == (1, 1)  # the first in the lane; from the GET on, aiohttp's


def test_a_multipart_form_and_a_query_string_are_read_by_aiohttp(lanes):
    conn = Conn(lanes("lane"))
    form = (
        b"--XX\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nformed\r\n--XX--\r\n"
    )  # fmt: skip
    conn.send(
        b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: %d\r\n\r\n%b" % (len(form), form)
    )
    status, _, body = conn.answer()
    assert status == 200 and json.loads(body)["echo"] == "formed"
    conn.close()
    conn = Conn(lanes("lane"))
    conn.send(plain(b"queried").replace(b"/echo ", b"/echo?x=1 "))
    status, _, body = conn.answer()
    assert status == 200 and json.loads(body)["echo"] == "queried"
    conn.close()


@pytest.mark.parametrize(
    "what, head",
    [
        ("two Content-Lengths", b"Content-Length: 2\r\nContent-Length: 3\r\n"),
        ("Content-Length and chunked", b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n"),
        ("a folded header", b"Content-Length: 2\r\nX-A: 1\r\n folded\r\n"),
        ("a control byte in a value", b"Content-Length: 2\r\nX-A: \x01\r\n"),
        ("a signed length", b"Content-Length: +2\r\n"),
        ("a header over aiohttp's 8,190 bytes", b"Content-Length: 2\r\nX-Big: " + b"Q" * 9000 + b"\r\n"),
        ("129 headers", b"Content-Length: 2\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(128))),
    ],
)
def test_heads_that_could_smuggle_a_request_or_pass_a_limit_meet_aiohttps_parser(lanes, what, head):
    conn = Conn(lanes("lane"))
    conn.send(b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\nhi")
    status, headers, body = conn.answer()
    assert status == 400 and headers["content-type"].startswith("application/json"), what
    assert set(json.loads(body)) == {"code", "type", "message"}, what
    assert conn.closed(), what  # the rest of the stream is never read as another request
    conn.close()
    lane = lanes.servers[0].lane
    assert (lane.taken, lane.handed) == (0, 1), what


def test_a_body_that_does_not_come_gets_408_and_an_idle_connection_is_closed(lanes):
    port = lanes("lane", body_read_timeout_s=1.0, idle_timeout_s=1.5)
    conn = Conn(port)
    conn.send(plain(b"0123456789")[:-7])  # the head and 3 of 10 bytes
    started = time.monotonic()
    status, headers, body = conn.answer()
    assert status == 408 and json.loads(body)["type"] == "BodyTimeoutError"
    assert 0.9 < time.monotonic() - started < 4 and headers["connection"] == "close"
    assert conn.closed()
    conn.close()
    for payload in (b"", b"POST /predictions/echo HTTP/1.1\r\nHost: 12"):  # nothing, or half a head
        conn = Conn(port)
        conn.send(payload)
        started = time.monotonic()
        assert conn.closed(within=6) and 1.4 < time.monotonic() - started < 4
        conn.close()


def test_the_token_and_the_site_rules_hold_in_the_lane(lanes, serve, echo_model, monkeypatch):
    port = lanes("lane", token="s3cret")
    conn = Conn(port)
    conn.send(plain(b"no token"))
    status, headers, body = conn.answer()
    assert status == 401 and headers["www-authenticate"] == "Bearer" and json.loads(body)["code"] == 401
    conn.send(plain(b"with token", b"Authorization: Bearer s3cret\r\n"))
    assert conn.answer()[0] == 200
    conn.close()
    # without the token, a big body is never waited for (nor held): 401 at once, and the connection
    # closes, since the rest of the stream is that body
    conn = Conn(port)
    started = time.monotonic()
    conn.send(plain(b"Q" * 3_000_000)[:300])
    status, headers, _ = conn.answer()
    assert status == 401 and headers["connection"] == "close" and time.monotonic() - started < 2
    assert conn.closed()
    conn.close()
    conn = Conn(lanes("lane"))
    conn.send(plain(b"x").replace(b"Host: 127.0.0.1", b"Host: evil.example"))
    status, _, body = conn.answer()
    assert status == 403 and "evil.example" in json.loads(body)["message"]
    conn.send(plain(b"x", b"Origin: https://evil.example\r\n"))
    assert conn.answer()[0] == 403
    conn.close()


def test_connection_close_and_an_oversize_body_close_the_connection(lanes):
    port = lanes("lane", max_request_size=1000)
    conn = Conn(port)
    conn.send(plain(b"bye", b"Connection: close\r\n"))
    status, headers, _ = conn.answer()
    assert status == 200 and headers["connection"] == "close" and conn.closed()
    conn.close()
    conn = Conn(port)
    conn.send(plain(b"Q" * 2000))
    status, _, body = conn.answer()
    assert status == 413 and json.loads(body)["code"] == 413 and conn.closed()
    conn.close()


RECORDING_HANDLER = """
import time


def handle(data, context):
    if not data:
        return None
    bodies = [row.get("body") for row in data]
    texts = [b.decode() if isinstance(b, (bytes, bytearray)) else str(b) for b in bodies]
    with open({seen!r}, "a") as seen:
        seen.write("".join(text + "\\n" for text in texts))
    for text in texts:
        if text.startswith("sleep:"):
            time.sleep(float(text[6:]))
    return texts
"""


def test_a_client_that_leaves_while_queued_never_reaches_the_handler(
    tmp_path, monkeypatch, serve, make_model
):
    monkeypatch.setenv("MODEL_ARCHIVER_FAST_LANE", "1")
    seen = tmp_path / "seen.txt"
    model = make_model("rec", handler_source=RECORDING_HANDLER.format(seen=str(seen)))
    port = serve([model], defaults=ModelSettings(batch_size=1, workers=1)).server.ports["inference"]
    busy, gone = Conn(port), Conn(port)
    busy.send(plain(b"sleep:1.5").replace(b"/echo", b"/rec"))
    time.sleep(0.3)
    gone.send(plain(b"gone").replace(b"/echo", b"/rec"))  # queued behind the sleeper
    time.sleep(0.3)
    gone.close()  # and its client leaves: the sweep cancels it within 0.25 s
    assert busy.answer()[0] == 200
    busy.send(plain(b"after").replace(b"/echo", b"/rec"))
    assert busy.answer()[2] == b"after"
    busy.close()
    assert seen.read_text().split() == ["sleep:1.5", "after"]


def test_expect_100_continue_and_a_body_in_pieces_are_read_in_the_lane(lanes):
    conn = Conn(lanes("lane"))
    head, body = plain(b"x" * 5000, b"Expect: 100-continue\r\n").split(b"\r\n\r\n", 1)
    conn.send(head + b"\r\n\r\n")  # as curl -T does: the head, then the body once told to go on
    while b"\r\n\r\n" not in conn.data:
        conn._fill()
    assert conn.data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    conn.data = conn.data[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
    for at in range(0, len(body), 1000):
        conn.send(body[at : at + 1000])
        time.sleep(0.01)
    status, _, answer = conn.answer()
    assert status == 200 and json.loads(answer)["echo"] == "x" * 5000
    conn.send(plain(b"y", b"Expect: 100-coffee\r\n"))  # an expectation nobody can meet: aiohttp's 417
    assert conn.answer()[0] == 417
    conn.close()
    lane = lanes.servers[0].lane
    assert (lane.taken, lane.handed) == (1, 1)


def test_both_lanes_stream_a_generator_handlers_answers_alike(monkeypatch, serve, make_model):
    model = make_model("gen", handler_source=GENERATOR_HANDLER)
    answers = {}
    for which, flag in (("lane", "1"), ("aiohttp", "0")):
        monkeypatch.setenv("MODEL_ARCHIVER_FAST_LANE", flag)
        server = serve([model]).server
        conn = Conn(server.ports["inference"])
        for body in (b"words", b"fail", b"words"):  # a failure mid-stream leaves the connection usable
            conn.send(plain(body).replace(b"/echo", b"/gen"))
            status, headers, streamed = conn.answer()
            answers.setdefault(which, []).append((status, headers.get("transfer-encoding"), streamed))
        conn.close()
        assert (server.lane.taken if server.lane else 3) == 3
    assert answers["lane"] == answers["aiohttp"]
    (status, chunked, words), (_, _, failed), _ = answers["lane"]
    assert status == 200 and chunked == "chunked" and words == b"one two three"
    assert failed.startswith(b"partial ") and json.loads(failed[len(b"partial ") :])["code"] == 500
