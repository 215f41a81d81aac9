"""The fast lane and aiohttp read every request alike: mutated prediction requests (a byte replaced or
inserted in the head, an odd header added, the body cut short or followed by more bytes) are sent as
raw bytes to two live servers, one with the lane and one without, and both must give the same answers
in the same order: the same statuses, and for each answered prediction the same body the handler saw
(but for one thing aiohttp does that the lane improves on: ``dropped_by_aiohttp``).
A request the lane reads differently from aiohttp (its length, where the next request starts, a header
aiohttp refuses) shows up here as two different answers."""

from __future__ import annotations

import json
import socket
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BASE = (
    b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 11\r\n\r\nhello world"
)
HEAD_END = BASE.index(b"\r\n\r\n")
BYTES = [b"\x00", b"\r", b"\n", b" ", b":", b"\t", b"A", b"0", b"9", b"\x7f", b"\x80", b"\xff", b"-"]
BYTES += [b"+", b",", b"/", b"%", b"?", b"#", b"\r\n", b"\r\n\r\n"]
HEADERS = [
    b"Content-Length: 11",
    b"Content-Length: 5",
    b"Content-Length:11",
    b"Content-Length: 011",
    b"Content-Length: 1 1",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: Chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding : chunked",
    b"Expect: 100-continue",
    b"Expect: 100-Continue",
    b"Expect: nothing",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Upgrade: websocket",
    b"Host: 127.0.0.1",
    b"Content-Type: multipart/form-data; boundary=x",
    b"Content-Type: application/x-www-form-urlencoded",
    b"X-Request-ID: fixed-id",
    b"X-Archiver-Body: json",
    b" X-Folded: 1",
    b"X-Empty:",
]
SILENCE_S = 0.3  # no more bytes for this long: the answers so far are all there are


def exchange(port: int, payload: bytes) -> list[tuple[int, str]]:
    """Send ``payload`` on a new connection; the answers that come: (status, what the handler saw)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = b""
    try:
        sock.sendall(payload)
        sock.settimeout(SILENCE_S)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return parse_answers(data)


def parse_answers(data: bytes) -> list[tuple[int, str]]:
    answers = []
    while b"\r\n\r\n" in data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status == 100:
            continue
        length = int(headers.get("content-length", 0))
        body, data = data[:length], data[length:]
        seen = ""
        if status == 200:
            seen = json.loads(body)["echo"]
        answers.append((status, seen))
    return answers


def dropped_by_aiohttp(lane: list[tuple[int, str]], plain: list[tuple[int, str]]) -> bool:
    """aiohttp reads every request a packet holds before answering any: when junk follows a good
    request in one packet, it answers only the junk's 400 and closes. The lane answers the good
    request first, then hands the junk to aiohttp for the same 400 (or closes first, when the request
    said ``Connection: close``)."""
    if not plain or plain[-1] != (400, ""):
        return False
    answered = lane[:-1] if lane and lane[-1] == (400, "") else lane
    return len(answered) >= len(plain) and answered[: len(plain) - 1] == plain[:-1]


mutation = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, HEAD_END - 1), st.sampled_from(BYTES)),
    st.tuples(st.just("insert"), st.integers(0, HEAD_END), st.sampled_from(BYTES)),
    st.tuples(st.just("header"), st.integers(1, 4), st.sampled_from(HEADERS)),
    st.tuples(st.just("body"), st.integers(0, 11), st.sampled_from([b"", b"X" * 40, BASE])),
)


def mutate(steps: list[tuple]) -> bytes:
    request = BASE
    for kind, at, what in steps:
        head, _, body = request.partition(b"\r\n\r\n")
        if kind == "replace":
            at = min(at, len(head) - 1)
            head = head[:at] + what + head[at + 1 :]
        elif kind == "insert":
            head = head[:at] + what + head[at:]
        elif kind == "header":
            lines = head.split(b"\r\n")
            lines.insert(min(at, len(lines)), what)
            head = b"\r\n".join(lines)
        else:  # the body cut at ``at`` bytes, then ``what`` after it (a second request, junk)
            body = body[:at] + what
        request = head + b"\r\n\r\n" + body
    return request


def test_mutated_requests_get_the_same_answers_with_and_without_the_lane(monkeypatch, serve, echo_model):
    ports = {}
    for which, flag in (("lane", "1"), ("aiohttp", "0")):
        monkeypatch.setenv("MODEL_ARCHIVER_FAST_LANE", flag)
        server = serve([echo_model], idle_timeout_s=1.0, body_read_timeout_s=1.0).server
        assert (server.lane is not None) == (which == "lane")
        ports[which] = server.ports["inference"]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(mutation, min_size=1, max_size=3))
    def same_answers(steps: list[tuple]) -> None:
        payload = mutate(steps)
        lane, plain = exchange(ports["lane"], payload), exchange(ports["aiohttp"], payload)
        assert lane == plain or dropped_by_aiohttp(lane, plain), payload

    same_answers()
