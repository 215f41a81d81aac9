"""Frames between the front and a worker keep every value as it was sent, whichever JSON codec wrote them.

Batch and answer headers go through the C codec (orjson) where it is installed; what it cannot write
exactly (a lone surrogate from a client's header, a handler's NaN figure) goes through the standard
one, and the reader takes either. Real frames over a real socket pair.
"""

from __future__ import annotations

import json
import math
import socket
import struct

import pytest

from archiver.serving.protocols import wire
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest


def _trip(chunks: list[bytes]) -> wire.Frame:
    left, right = socket.socketpair()
    with left, right:
        wire.send_frame(left, chunks)
        frame = wire.read_frame(right)
    assert frame is not None
    return frame


def test_a_batch_comes_back_whole_headers_bodies_and_threads() -> None:
    requests = [
        RawRequest(
            "r1",
            {"Content-Type": "application/json", "X-Name": "café ☕"},
            [("body", b"[1, 2]", "application/json")],
        ),
        RawRequest("r2", {}, [("data", b"\x00\xff" * 10, "image/png"), ("extra", b"", "text/plain")]),
    ]
    frame = _trip(wire.batch_frame(7, requests, threads=2))
    assert frame.kind == "batch" and frame.header["threads"] == 2
    assert wire.read_batch(frame) == (7, requests)


def test_a_header_value_with_a_lone_surrogate_still_reaches_the_worker() -> None:
    # aiohttp hands undecodable header bytes over as surrogate escapes; the C codec refuses them
    odd = b"caf\xe9".decode("utf-8", "surrogateescape")
    request = RawRequest("r1", {"X-Odd": odd}, [("body", b"x", "text/plain")])
    assert wire.read_batch(_trip(wire.batch_frame(1, [request]))) == (1, [request])


def test_a_handlers_nan_figure_stays_nan_not_null() -> None:
    answers = [InferenceResponse(body=b"ok", content_type="text/plain")]
    metrics = [{"name": "Score", "value": float("nan"), "unit": "ms"}]
    frame = _trip(wire.answers_frame(3, answers, metrics=metrics))
    assert math.isnan(frame.header["metrics"][0]["value"])
    batch_id, back = wire.read_answers(frame)
    assert batch_id == 3 and back[0].body == b"ok"


def test_answers_without_figures_come_back_whole() -> None:
    answers = [
        InferenceResponse(body=b'{"a": 1}', content_type="application/json", headers={"X-Tag": "ü"}),
        InferenceResponse(status=400, body=b"", error_type="HandlerInputError", message="bad input"),
    ]
    batch_id, back = wire.read_answers(_trip(wire.answers_frame(9, answers)))
    assert batch_id == 9
    assert [(a.status, a.body, a.headers, a.error_type, a.message) for a in back] == [
        (200, b'{"a": 1}', {"X-Tag": "ü"}, None, None),
        (400, b"", {}, "HandlerInputError", "bad input"),
    ]


@pytest.mark.parametrize("head", [b"not json", b"\xff\xfe", b"[1, 2]", b'{"no": "kind"}'])
def test_a_malformed_header_is_a_wire_error_not_a_crash(head: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack("!II", len(head), 0) + head)
        with pytest.raises(wire.WireError):
            wire.read_frame(right)


def test_a_header_the_standard_codec_wrote_with_nan_is_read() -> None:
    head = json.dumps({"kind": "answers", "batch": 1, "responses": [], "metrics": [{"value": float("inf")}]})
    frame = _trip([struct.pack("!II", len(head), 0), head.encode()])
    assert frame.header["metrics"][0]["value"] == math.inf


def test_without_the_c_codec_a_worker_in_a_models_own_venv_reads_and_writes_the_same(monkeypatch) -> None:
    request = RawRequest("r1", {"X-Name": "café"}, [("body", b"[1]", "application/json")])
    written_fast = wire.batch_frame(5, [request])
    monkeypatch.setattr(wire, "orjson", None)
    assert wire.read_batch(_trip(written_fast)) == (5, [request])  # read without it
    assert wire.read_batch(_trip(wire.batch_frame(5, [request]))) == (5, [request])  # written without it
