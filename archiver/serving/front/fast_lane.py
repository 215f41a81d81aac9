"""The inference port's fast lane: a plain ``POST /predictions/{model}`` answered without aiohttp's request
and response objects; every other request, from its first byte, is aiohttp's as before.

Why: on the tiny model at 32 clients the front spent about 80 µs of CPU per request, 40% of it building
and tearing down aiohttp's per-request objects (request, task, middleware chain, response, writer), and
the front is the slowest of the three programs sharing the cores (client, front, worker). A prediction's
own work (the token or site check, the router, the batcher, the metrics) is the same in both lanes: this
file only reads the request's head and body and writes the answer's bytes.

What the lane takes is narrow on purpose, so that whatever it does not understand meets aiohttp's
strict parser and every limit it enforces: HTTP/1.1, ``POST`` or ``PUT`` on ``/predictions/{model}``
or ``/predictions/{model}/{version}`` (or ``/explanations``) with a plain path, header names that are
tokens and values with no control bytes, a ``Host``, one ``Content-Length`` and no ``Transfer-Encoding``
or ``Upgrade`` (``Expect: 100-continue`` is answered), a body within the server's size limit and
``BODY_MAX``, and not a multipart form (``fast_lane_heads.py`` has the whole rule). The
first request on a connection that is anything else hands the connection, with every byte not yet
answered, to aiohttp's protocol (``JsonErrorProtocol``) for the rest of its life.

The lane keeps aiohttp's promises: one request at a time per connection, answered in order; an idle
connection (no complete head) closed after ``idle_timeout_s``; a body that has not all come within
``body_read_timeout_s`` answered 408 (the router reads the body after the token check and the model
lookup, so a refused or unknown request is answered without waiting for it); a client that goes
away cancels its request (``client_watch``); reading stops while the client does not read its
answers; and a drain (``close``, ``shutdown``) lets the request in hand finish. It leans on
aiohttp's ``web.Server._connections`` to be drained with the rest, which ``parse_errors.py``
already pins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from archiver.errors import ArchiverError, BodyTimeoutError, UnauthorizedError
from archiver.serving.front.client_watch import ClientGone, while_connected
from archiver.serving.front.fast_lane_heads import HEAD_MAX, Head, PlainBody, read_head
from archiver.serving.front.fast_lane_port import Lane
from archiver.serving.front.fast_lane_replies import error_reply, head_bytes
from archiver.serving.front.middlewares import refusal
from archiver.serving.front.streamed_replies import next_while_connected
from archiver.serving.protocols import router
from archiver.serving.protocols.answer_stream import AnswerStream
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.redaction import public_message

log = logging.getLogger("archiver.serving")


class LaneConnection(asyncio.Protocol):
    """One connection of the inference port: the lane's requests here, the rest handed to aiohttp."""

    def __init__(self, lane: Lane, server: web.Server, make_aiohttp: Callable[[], Any]) -> None:
        self.lane, self.server, self._make_aiohttp = lane, server, make_aiohttp
        self.transport: asyncio.Transport | None = None
        self._aiohttp: Any = None  # aiohttp's protocol, once the connection is handed over
        self._buffer = bytearray()
        self._busy = False  # a request taken, not yet answered
        self._task: asyncio.Task | None = None
        self._since = time.monotonic()  # the connection's last answer (or its start)
        # a request whose body has not all come: its length, its reader, and when its head came
        self._waiting: tuple[int, PlainBody, float] | None = None
        self._write_paused = False
        self._drained: asyncio.Future | None = None
        self._reading_paused = False
        self._closing = False  # answer what is in hand, then close (a drain, or Connection: close)
        self._port: int | None = None

    # ---- asyncio's protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sockname = transport.get_extra_info("sockname")
        self._port = sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None
        self.server._connections[self] = transport  # drained with aiohttp's own (web.Server.shutdown)
        self.lane.add(self)

    def data_received(self, data: bytes) -> None:
        if self._aiohttp is not None:
            self._aiohttp.data_received(data)
            return
        self._buffer += data
        if self._waiting is not None:
            self._fill_body()
        if len(self._buffer) > HEAD_MAX + self.lane.body_max and not self._reading_paused:
            self._pause_reading()  # a client sending ahead of its answers waits for them
        if not self._busy:
            self._next()

    def eof_received(self) -> bool | None:
        if self._aiohttp is not None:
            return self._aiohttp.eof_received()
        return None  # as aiohttp: the transport closes; a request in hand sees its client gone

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._aiohttp is not None:
            self._aiohttp.connection_lost(exc)
            return
        self.lane.connections.discard(self)
        self.server._connections.pop(self, None)
        self.transport = None  # a request in hand sees its client gone (client_watch)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        if self._aiohttp is not None:
            self._aiohttp.pause_writing()
            return
        self._write_paused = True

    def resume_writing(self) -> None:
        if self._aiohttp is not None:
            self._aiohttp.resume_writing()
            return
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not self._busy and self.transport is not None:
            self._next()

    # ---- aiohttp's web.Server drains connections through these ---------------------------------
    def close(self) -> None:
        """Answer the request in hand, then close (aiohttp's pre-shutdown)."""
        if self._aiohttp is not None:
            self._aiohttp.close()
            return
        self._closing = True
        if not self._busy and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Wait up to ``timeout`` for the request in hand, then as long again while the server ends
        its workers (its answer then says so: ``Server.stop``), then close (as aiohttp's own do)."""
        if self._aiohttp is not None:
            await self._aiohttp.shutdown(timeout)
            return
        self._closing = True
        task = self._task
        for _ in range(2):
            if task is not None and not task.done():
                await asyncio.wait([task], timeout=timeout)
        if task is not None and not task.done():
            task.cancel()
        if self.transport is not None:
            self.transport.close()

    # ---- the lane --------------------------------------------------------------------------------
    def look(self, now: float) -> None:
        """The sweep's look: close an idle connection; fail a body that has not all come in time (the
        request then answers 408 and the connection closes)."""
        transport = self.transport
        if self._aiohttp is not None or transport is None:
            return
        if self._waiting is not None:
            _, body, since = self._waiting
            if now - since > self.lane.limits.body_read_timeout_s:
                arrived = body.arrived
                if arrived is not None and not arrived.done():
                    seconds = self.lane.limits.body_read_timeout_s
                    arrived.set_exception(
                        BodyTimeoutError(f"request body not received within {seconds:g} seconds")
                    )
        elif not self._busy and now - self._since > self.lane.idle_timeout_s:
            transport.close()

    def _next(self) -> None:
        """Take the next request in the buffer once its head is there, or hand the connection over."""
        if self._write_paused or self._closing or self.transport is None:
            if self._closing and self.transport is not None:
                self.transport.close()
            return
        buffer = self._buffer
        head = read_head(buffer, self.lane.body_max)
        if head is None:
            return  # more bytes to come (the sweep watches the time)
        if head is False:
            self._hand_over()
            return
        body = PlainBody(head.headers, self.lane.limits)
        end = head.size + head.length
        if len(buffer) >= end:  # most requests: the body came with its head
            body.body = bytes(buffer[head.size : end])
            del buffer[:end]
        else:  # the request starts now; its body is read as it comes (``_fill_body``)
            del buffer[: head.size]
            body.arrived = asyncio.get_running_loop().create_future()
            self._waiting = (head.length, body, time.monotonic())
            if head.expect:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._busy = True
        self.lane.taken += 1
        self._task = asyncio.get_running_loop().create_task(self._answer(head, body))
        if self._reading_paused and len(buffer) <= HEAD_MAX:
            self._resume_reading()

    def _fill_body(self) -> None:
        """The body being waited for, once all of it is in the buffer."""
        assert self._waiting is not None
        length, body, _ = self._waiting
        if len(self._buffer) < length:
            return
        body.body = bytes(self._buffer[:length])
        del self._buffer[:length]
        self._waiting = None
        if body.arrived is not None and not body.arrived.done():
            body.arrived.set_result(None)

    def _hand_over(self) -> None:
        """From here on the connection is aiohttp's, starting with the bytes not yet answered."""
        transport = self.transport
        assert transport is not None
        self.lane.connections.discard(self)
        self.lane.handed += 1
        self.server._connections.pop(self, None)
        self._aiohttp = handler = self._make_aiohttp()
        handler.connection_made(transport)
        if self._reading_paused:
            self._resume_reading()
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            handler.data_received(data)

    async def _answer(self, head: Head, body: PlainBody) -> None:
        lane = self.lane
        started = time.perf_counter()
        try:
            refused = refusal(head.method, head.path, head.headers, self._port, lane.limits, lane.open_paths)
            if refused is not None:
                extra = {"WWW-Authenticate": "Bearer"} if isinstance(refused, UnauthorizedError) else {}
                self._write(error_reply(refused, extra), self._must_close(head))
                return
            call = router.Call(
                head.method, head.path, head.params, head.headers, body,
                lane.limits.max_request_items,
            )  # fmt: skip
            try:
                reply = await while_connected(self, head.operation(lane.host, call))
            except ClientGone:
                log.info("%s: the client went away before its answer; its request was cancelled", head.path)
                return
            except ArchiverError as exc:
                reply = error_reply(exc)
            except Exception as exc:  # noqa: BLE001 - the HTTP edge: a bug answers 500 JSON, never a traceback
                log.exception("internal error on %s %s", head.method, head.path)
                said, name = public_message(exc), type(exc).__name__
                reply = error_reply(exc, message=said if said == name else f"{name}: {said}")
            if reply.stream is not None:
                await self._write_stream(head, reply, reply.stream, started)
                return
            self._write(reply, self._must_close(head))
            if reply.label is not None:
                version = head.params.get("version") if reply.label != "-" else None
                lane.metrics.observe_request(
                    reply.label, reply.status, time.perf_counter() - started, version or "default"
                )
        finally:
            if self._waiting is not None:  # answered without its body (refused, unknown, timed out):
                self._waiting = None  # the rest of the stream is not a request
                self._closing = True
            self._busy = False
            self._task = None
            self._since = time.monotonic()
            if self.transport is not None and not self.transport.is_closing():
                self._next()

    def _must_close(self, head: Head) -> bool:
        """Whether the connection closes after this answer: the client asked, or the body was not
        read to its end (what is left of it is not the next request)."""
        if self._waiting is not None:
            self._closing = True
        return head.close or self._closing

    def _write(self, reply: router.Reply, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        close = close or reply.close or self._closing
        try:
            head = head_bytes(reply, self.lane.date(), close)
        except ValueError as exc:  # a handler's header no answer can carry (answer_checks.py should catch it)
            log.error("%s: %s", reply.label, exc)
            reply, close = error_reply(ArchiverError(str(exc))), True
            head = head_bytes(reply, self.lane.date(), close)
        transport.write(head + reply.body if len(reply.body) < 65536 else head)
        if len(reply.body) >= 65536:
            transport.write(reply.body)
        if close:
            self._closing = True
            transport.close()

    async def _drain(self) -> None:
        if self._write_paused and self.transport is not None:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
            self._drained = None

    async def _write_stream(
        self, head: Head, reply: router.Reply, stream: AnswerStream, started: float
    ) -> None:
        """A streaming handler's answers, each one chunk the moment it arrives (as streamed_replies.py)."""
        failed: InferenceResponse | None = None
        try:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            transport.write(head_bytes(reply, self.lane.date(), self._must_close(head), chunked=True))
            self._chunk(reply.body)
            while True:
                await self._drain()
                if self.transport is None or self.transport.is_closing():
                    raise ClientGone  # as aiohttp's write would raise: nobody reads the rest
                answer = await next_while_connected(self, stream)
                if answer is None:
                    break
                self._chunk(answer.body)
                if not answer.ok:
                    failed = answer
            if self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        except ClientGone:
            log.info("%s: the client went away mid-stream; its request was cancelled", head.path)
        finally:
            await stream.aclose()
            if reply.label is not None:
                version = head.params.get("version") or "default"
                self.lane.metrics.observe_request(
                    reply.label, reply.status, time.perf_counter() - started, version
                )
        if failed is not None:
            log.warning(
                "%s: the stream ended with %d after %d answers: %s",
                head.path,
                failed.status,
                stream.received - 1,
                failed.message,
            )
        if self._closing and self.transport is not None:
            self.transport.close()

    def _chunk(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def _pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def _resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()
        self._reading_paused = False
