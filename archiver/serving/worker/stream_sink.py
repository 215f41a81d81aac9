"""The worker's answer sink: a streaming handler's intermediate answers, written to the supervisor at once.

``handlers/streaming.py`` hands each intermediate answer to the sink installed on the handler's
context; this one encodes it as a final answer would be (``handler_answers.answer_response``: the
context's status, headers and content type for its position) and writes a ``parts`` frame on the
worker's socket while the handler goes on. It also hears cancellations: during a batch the supervisor
sends nothing but ``cancel`` frames, so each send first reads any that arrived (without waiting), and
a send only for cancelled requests raises ``StreamCancelledError``. Sends outside a batch (a handler's
thread that outlived it) raise too: nobody waits for them.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Mapping
from typing import Any

from archiver.serving.protocols import wire
from archiver.serving.protocols.records import InferenceResponse, error_response
from archiver.serving.worker.handler_answers import answer_response
from handlers.streaming import StreamCancelledError, StreamError


class WorkerSink:
    """The ``AnswerSink`` of one worker process (``handlers.streaming.AnswerSink``)."""

    def __init__(self, sock: socket.socket, model_dir: Any) -> None:
        self._sock = sock
        self._model_dir = model_dir
        # A handler may send from threads of its own: one frame at a time, one reader of cancellations.
        self._lock = threading.Lock()
        self._batch = 0
        self._count = 0
        self._active = False
        self._cancelled: set[int] = set()
        self._ended: list[int] = []
        self._server_gone = False

    # ---- the worker's loop ---------------------------------------------------------------------
    def begin(self, batch_id: int, count: int) -> None:
        """A batch of ``count`` requests starts."""
        with self._lock:
            self._batch, self._count, self._active = batch_id, count, True
            if self._cancelled:
                self._cancelled = set()

    def finish(self) -> list[int] | None:
        """The batch is over: the requests whose stream ended before its answers frame (None: none)."""
        with self._lock:
            self._active = False
            ended, self._ended = self._ended, []
        return ended or None

    # ---- the handler's side --------------------------------------------------------------------
    def send(self, answers: Mapping[int, Any], context: Any) -> None:
        with self._lock:
            if not self._active:
                raise StreamCancelledError("no request is waiting: the batch this answer was for is over")
            self._read_cancellations()
            parts = []
            for index, value in answers.items():
                if not isinstance(index, int) or not 0 <= index < self._count:
                    raise IndexError(f"request index {index!r} is outside this batch of {self._count}")
                if index not in self._cancelled:
                    parts.append((index, self._encode(context, index, value)))
            if not parts:
                raise StreamCancelledError()
            wire.send_frame(self._sock, wire.parts_frame(self._batch, parts))

    def cancelled(self, index: int) -> bool:
        with self._lock:
            if self._active:
                self._read_cancellations()
            return not self._active or index in self._cancelled

    def ended(self, index: int) -> None:
        with self._lock:
            self._ended.append(index)

    def _encode(self, context: Any, index: int, value: Any) -> InferenceResponse:
        if isinstance(value, StreamError):
            return error_response(value.status, "HandlerError", value.message)
        return answer_response(context, index, value, self._model_dir)

    def _read_cancellations(self) -> None:
        """Take the ``cancel`` frames waiting on the socket, never blocking for one that has not come."""
        if self._server_gone:
            return
        while select.select([self._sock], [], [], 0)[0]:
            frame = wire.read_frame(self._sock)  # the supervisor writes each small frame whole
            if frame is None:  # the server closed the connection: nobody will read these answers
                self._server_gone = True
                self._cancelled.update(range(self._count))
                return
            if frame.kind == "cancel" and frame.header.get("batch") == self._batch:
                index = frame.header.get("index")
                if isinstance(index, int):
                    self._cancelled.add(index)
            elif frame.kind != "cancel":
                raise wire.WireError(f"unexpected frame {frame.kind!r} during a batch")
