"""Requests that try to break a live server. Each gets a clear refusal, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import zlib
from pathlib import Path

import pytest

from archiver.serving.supervisor.registry import ModelSettings


def _healthy(server, call) -> None:
    """After every attack: /ping answers and a good request succeeds."""
    assert call("GET", server.url() + "/ping").status == 200
    assert call("POST", server.url() + "/predictions/echo", b"still fine").json()["echo"] == "still fine"


def _png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    """A tiny CNN behind the built-in image_classifier handler."""
    import torch

    from archiver.build import build_archive
    from archiver.export import export_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=8),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 6),
    )
    work = tmp_path / "cnn"
    work.mkdir()
    export_model(model, torch.rand(1, 3, 224, 224), work / "cnn.pt")
    (work / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(6)}))
    return build_archive(
        model_name="cnn",
        version="1.0",
        handler="image_classifier",
        serialized_file=str(work / "cnn.pt"),
        extra_files=str(work / "index_to_name.json"),
        export_path=str(tmp_path / "store"),
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_handler_refuses_junk_bombs_and_empty_bodies_with_400(
    serve, call, classifier, echo_model, kitten_bytes
):
    server = serve([classifier, echo_model])
    url = server.url() + "/predictions/cnn"
    attacks = {  # what → (body, a phrase the refusal must name)
        "not an image": (b"%PDF-1.4 definitely not a picture", "not an image"),
        "decompression bomb": (_png_claiming(100_000, 100_000), "too large"),
        # Just over the limit, under the 2x at which PIL itself refuses: only our own check stops it
        # before a 270 MB buffer is allocated (decoding would fail later, but only after that).
        "just over the pixel limit": (_png_claiming(10_000, 9_000), "over the limit of 89478485"),
        "empty body": (b"", "empty body"),
    }
    for what, (body, phrase) in attacks.items():
        reply = call("POST", url, body)
        assert reply.status == 400, what
        assert reply.json()["type"] == "HandlerInputError", what
        assert phrase in reply.json()["message"], (what, reply.json())
        _healthy(server, call)
    invalid_json = call("POST", url, b'{"not": json', {"Content-Type": "application/json"})
    assert invalid_json.status == 400
    assert len(call("POST", url, kitten_bytes).json()) == 5  # top-5 classes for the real photo


def test_malformed_multipart_is_a_400(serve, call, echo_model):
    server = serve([echo_model])
    for body, ctype in [
        (
            b"--B\r\nContent-Disposition: form-data; name=data\r\n\r\nno closing boundary",
            "multipart/form-data; boundary=B",
        ),
        (b"garbage without any boundary", "multipart/form-data; boundary=B"),
        (b"--B--\r\n", "multipart/form-data; boundary=B"),
    ]:
        reply = call("POST", server.url() + "/predictions/echo", body, {"Content-Type": ctype})
        assert reply.status == 400, body
        assert reply.json()["code"] == 400
        _healthy(server, call)


@pytest.mark.parametrize(
    "path",
    [
        "/predictions/..%2F..%2Fetc%2Fpasswd",
        "/predictions/%2e%2e/%2e%2e",
        "/predictions/echo/..%2F..",
        "/predictions/.echo",
        "/predictions/echo%00",
    ],
)
def test_path_tricks_in_model_names_are_404(serve, call, echo_model, path):
    server = serve([echo_model])
    reply = call("POST", server.url() + path, b"x")
    assert reply.status == 404 and reply.json()["code"] == 404
    assert call("GET", server.url("management") + path.replace("/predictions", "/models")).status == 404
    _healthy(server, call)


def test_a_client_trickling_its_headers_is_cut_off_without_holding_a_worker(serve, call, echo_model):
    server = serve([echo_model], idle_timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", server.server.ports["inference"]), timeout=20) as slow:
        slow.sendall(b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        _healthy(server, call)  # meanwhile everyone else is served
        try:
            closed = slow.recv(1024) == b""  # the server hangs up on the trickler
        except ConnectionResetError:
            closed = True
    assert closed
    _healthy(server, call)


def test_a_client_sending_its_headers_byte_by_byte_is_cut_off_before_it_finishes(serve, call, echo_model):
    """Slowloris: every byte arrives in time for a per-read timeout, but the whole head never does."""
    import select

    server = serve([echo_model], idle_timeout_s=1.0)
    head = b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", server.server.ports["inference"]), timeout=20) as slow:
        try:
            for byte in head:
                slow.sendall(bytes([byte]))
                sent += 1
                readable, _, _ = select.select([slow], [], [], 0.02)  # paces the trickle: 50 bytes a second
                if readable and slow.recv(1024) == b"":
                    break
                if sent % 25 == 0:
                    _healthy(server, call)  # meanwhile the one worker serves everyone else
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < len(head), "the server waited for a head trickled over 40 seconds"
    _healthy(server, call)


def test_a_client_that_stalls_its_body_gets_408_and_its_connection_back(serve, call, raw, echo_model):
    server = serve([echo_model], body_read_timeout_s=1.0)
    stalled = b"POST /predictions/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nonly part"
    answer = raw(server.server.ports["inference"], stalled, timeout=20)
    assert answer.startswith(b"HTTP/1.1 408")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["type"] == "BodyTimeoutError"
    register = (
        b"POST /models HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{"
    )
    assert raw(server.server.ports["management"], register, timeout=20).startswith(b"HTTP/1.1 408")
    _healthy(server, call)


def test_a_thousand_concurrent_connections_each_get_exactly_one_answer(serve, call, echo_model):
    import aiohttp

    server = serve([echo_model], defaults=ModelSettings(batch_size=16, max_batch_delay_ms=5, queue_size=2000))
    url = server.url() + "/predictions/echo"

    async def storm() -> list[tuple[int, str]]:
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def one(i: int) -> tuple[int, str]:
                async with session.post(url, data=f"req-{i}".encode()) as resp:
                    body = await resp.json(content_type=None)
                    return resp.status, body.get("echo", "")

            return await asyncio.gather(*(one(i) for i in range(1000)))

    results = asyncio.run(storm())
    assert len(results) == 1000
    assert all(status == 200 for status, _ in results)
    assert [echo for _, echo in results] == [f"req-{i}" for i in range(1000)]
    _healthy(server, call)


def test_a_thousand_concurrent_connections_over_a_small_queue_get_200_or_a_quick_503(serve, call, echo_model):
    import aiohttp

    server = serve([echo_model], defaults=ModelSettings(queue_size=10))
    url = server.url() + "/predictions/echo"

    async def storm() -> list[int]:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(i: int) -> int:
                async with session.post(url, data=b"sleep:0.001") as resp:
                    await resp.read()
                    return resp.status

            return await asyncio.gather(*(one(i) for i in range(1000)))

    statuses = asyncio.run(storm())
    assert len(statuses) == 1000 and set(statuses) <= {200, 503}
    assert 200 in statuses and 503 in statuses
    _healthy(server, call)
