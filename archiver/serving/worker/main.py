"""The worker process: one handler instance, answering the batches its server sends over a socket.

Started by the front as ``python -m archiver.serving.worker.main SOCKET_FD LIFELINE_FD`` in a fresh
interpreter (spawned, never forked from a process that imported torch). It knows only its job: load
the archive named in the ``init`` frame, say ``ready`` (or ``load_failed`` with the reason), then answer
each ``batch`` frame with one ``answers`` frame until the socket closes. It never decides to restart:
the front's supervisor owns its life. It dies with its server: the lifeline pipe's write end is held
only by the server, so when the server is gone (even by SIGKILL) the read below returns and the worker
exits, whatever its handler is doing.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import traceback
from typing import Any

from archiver.errors import ArchiverError, WireError
from archiver.serving.protocols import wire
from archiver.serving.protocols.records import InferenceResponse, error_response


def _exit_with_server(lifeline_fd: int) -> None:
    def watch() -> None:
        try:
            while os.read(lifeline_fd, 4096):
                pass
        except OSError:
            pass
        os._exit(0)  # the server is gone: nobody will read our answers

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def _pin_threads(threads: int | None) -> None:
    """Apply the operator's --torch-threads exactly (through OMP_NUM_THREADS torch caps it at the
    cores), after loading, and only in a worker whose handler uses torch at all."""
    torch = sys.modules.get("torch")
    if threads and torch is not None:
        torch.set_num_threads(int(threads))


def _follow_threads(threads: Any) -> None:
    """Run this batch with the torch threads the server gave it: the cores over all workers now, which
    changes when a model is scaled or calibrated after this worker started (supervisor/calibration.py)."""
    torch = sys.modules.get("torch")
    if isinstance(threads, int) and threads > 0 and torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _load(init: dict[str, Any]) -> Any:
    from archiver.serving.worker.loader import load_model

    return load_model(
        init["source"],
        name=init["name"],
        cache_dir=init.get("cache_dir"),
        gpu_id=init.get("gpu_id"),
        batch_size=int(init.get("batch_size") or 1),
        signed_sha256=init.get("signed_sha256"),  # the sha256 the server verified; None: unsigned
    )


def _device_of(model: Any) -> str | None:
    """Where the handler put its model (``BaseHandler.device``: ``cuda:0``, ``cpu``), for the describe
    API; None for a handler that keeps no ``device``."""
    device = getattr(getattr(model, "handler", None), "device", None)
    return str(device)[:64] if device is not None else None  # the handler's value: bounded


def _log_block(title: str, trace: Any) -> None:
    from archiver.serving.worker.tracebacks import error_block

    print(error_block(title, trace), file=sys.stderr, flush=True)


def _log_handler_error(model: Any, exc: BaseException) -> None:
    """A batch the handler failed (each request got a 500): the frames in the archive's own files, so
    the server's log shows where the handler broke (the front logs these stderr lines)."""
    from archiver.serving.worker.tracebacks import user_trace
    from handlers.streaming import StreamCancelledError

    if isinstance(exc, StreamCancelledError):  # its client went away: the front said so already
        return
    _log_block(f'handler error in model "{model.name}"', user_trace(exc, model.model_dir))


def _drain_metrics(model: Any) -> list[dict[str, Any]]:
    """What the handler reported through ``context.metrics`` since the last batch (usually nothing)."""
    drain = getattr(getattr(model.context, "metrics", None), "drain", None)
    if drain is None:
        return []
    try:
        return drain()
    except Exception:  # noqa: BLE001 - a handler that replaced context.metrics must not fail its batch
        return []


def serve_batches(sock: socket.socket) -> int:
    """Load the model named by the first frame, then answer batches until the server closes the socket."""
    init = wire.read_frame(sock)
    if init is None:
        return 0
    if init.kind != "init":
        raise WireError(f"expected an init frame, got {init.kind!r}")
    try:
        model = _load(init.header)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported, not raised
        from archiver.errors import ArchiverError
        from archiver.serving.protocols.redaction import public_message

        # our own messages as they are; anything else as one line without interpreter paths
        if isinstance(exc, ArchiverError):
            reason = exc.message
        else:
            reason = f"{type(exc).__name__}: {public_message(exc)}"
        if not isinstance(exc, ArchiverError):
            traceback.print_exc()
        trace = getattr(exc, "trace", None)
        if trace is not None and trace.frames:  # the handler's own code raised: show where, in its files
            _log_block(f'handler failed to load in model "{init.header.get("name")}"', trace)
        wire.send_frame(sock, wire.frame_chunks("load_failed", {"message": reason}))
        return 0
    model.on_handler_error = lambda exc: _log_handler_error(model, exc)
    sink = _install_sink(sock, model)
    _pin_threads(init.header.get("threads"))
    from archiver.heap_trim import HeapTrimmer

    HeapTrimmer().start()
    ready = {"pid": os.getpid(), "load_time_s": model.load_time_s, "device": _device_of(model)}
    wire.send_frame(sock, wire.frame_chunks("ready", ready))
    while True:
        frame = wire.read_frame(sock)
        if frame is None:
            return 0
        if frame.kind != "batch":
            if frame.kind == "cancel":
                continue  # for a batch already answered: it crossed our answers on the way
            raise WireError(f"unexpected frame {frame.kind!r}")
        batch_id, raw = wire.read_batch(frame)
        _follow_threads(frame.header.get("threads"))
        # Tell the server the batch is ours before the handler touches it: if this process dies
        # before that, the server knows the batch never ran and gives it to another worker.
        wire.send_frame(sock, wire.frame_chunks("taken", {"batch": batch_id}))
        sink.begin(batch_id, len(raw))
        responses = answer_batch(model, raw)
        ended = sink.finish()
        wire.send_frame(sock, _answers_frame(batch_id, responses, _drain_metrics(model), ended))


def _install_sink(sock: socket.socket, model: Any) -> Any:
    """The sink a streaming handler's intermediate answers go through (``stream_sink.py``)."""
    from archiver.serving.worker.stream_sink import WorkerSink
    from handlers.streaming import install_sink

    sink = WorkerSink(sock, model.model_dir)
    install_sink(model.context, sink)
    return sink


def answer_batch(model: Any, raw: list[wire.RawRequest]) -> list[InferenceResponse]:
    """One response per request, whatever its bytes or the handler do; never raises.

    Each request is decoded on its own (a JSON body nested past the parser's limit is that request's
    400), the rest run through the handler, and anything the handler's batch raises past the loader
    (our own code's failure on a strange input) answers each request of it a 500: the worker lives.
    """
    responses: list[InferenceResponse | None] = [None] * len(raw)
    requests = []
    for index, one in enumerate(raw):
        try:
            requests.append(wire.to_inference_request(one))
        except Exception as exc:  # noqa: BLE001 - the client's bytes fail their own request alone
            responses[index] = _failure(exc, 400)
    try:
        answered = model.handle(requests) if requests else []
        if len(answered) != len(requests):
            raise WireError(f"{len(answered)} answers for {len(requests)} requests")
    except Exception as exc:  # noqa: BLE001 - the last line of defence: the batch fails, not the worker
        traceback.print_exc()
        answered = [_failure(exc, 500) for _ in requests]
    pending = iter(answered)
    return [response if response is not None else next(pending) for response in responses]


def _failure(exc: BaseException, status: int) -> InferenceResponse:
    from archiver.serving.protocols.redaction import public_message

    if isinstance(exc, ArchiverError):
        return error_response(exc.http_status, type(exc).__name__, public_message(exc))
    return error_response(status, type(exc).__name__, public_message(exc))


def _answers_frame(
    batch_id: int,
    responses: list[InferenceResponse],
    metrics: list[dict[str, Any]],
    ended: list[int] | None = None,
) -> list[bytes]:
    """The answers frame; if the handler's metrics cannot be encoded they are left out, and if the
    answers themselves cannot (over the wire's 4 GiB), each request gets a 500 saying so."""
    try:
        return wire.answers_frame(batch_id, responses, metrics, ended)
    except (TypeError, ValueError, RecursionError, WireError):
        pass
    try:
        return wire.answers_frame(batch_id, responses, ended=ended)
    except (TypeError, ValueError, RecursionError, WireError) as exc:
        failed = _failure(WireError(f"the batch's answers cannot be sent: {exc}"), 500)
        return wire.answers_frame(batch_id, [failed for _ in responses])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m archiver.serving.worker.main SOCKET_FD LIFELINE_FD", file=sys.stderr)
        return 2
    sock_fd, lifeline_fd = int(argv[0]), int(argv[1])
    _exit_with_server(lifeline_fd)
    from archiver.serving.worker.handler_logging import configure_handler_logging

    configure_handler_logging()  # a handler's logging.info lines reach the server's log, as TorchServe's
    # A segfault in native code prints the crashing thread's Python stack to stderr first (the
    # server quotes it in the death message); the other threads are ours and only add noise.
    faulthandler.enable(all_threads=False)
    sock = socket.socket(fileno=sock_fd)
    try:
        return serve_batches(sock)
    except (WireError, BrokenPipeError, ConnectionResetError) as exc:
        print(f"worker: connection to the server lost: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
