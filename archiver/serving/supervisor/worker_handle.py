"""The front's handle on one worker process: spawn it, hand it batches, watch it, end it.

It owns the process and its pipes and knows how the process ended; what to do about an ending
(answer the batch, restart, give up) is the supervisor's business (``pool.py``). Its output is read
all the time, so a handler printing megabytes never blocks on a full pipe: lines go to the server's
log within a budget (the excess is counted, not stored), and the last stderr lines are kept for the
message that explains a death.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from archiver.errors import WorkerDiedError, WorkerGoneError, WorkerStartError
from archiver.serving.protocols import wire
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.redaction import redact_paths
from archiver.serving.supervisor.states import WorkerState
from archiver.serving.supervisor.streams import route_parts
from archiver.serving.supervisor.worker_output import WorkerOutput, crash_lines

log = logging.getLogger("archiver.worker")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads and how it runs; the same for every worker of one model version."""

    model: str
    source: str
    cache_dir: str | None = None
    batch_size: int = 1
    threads: int | None = None  # torch threads the operator pinned (--torch-threads); None: the env's
    gpu_id: int | None = None
    python: str = sys.executable
    # the sha256 the server's signature check verified (serve --trusted-key): the worker loads those
    # bytes or none. Sent in the start message, never inherited from an environment.
    signed_sha256: str | None = None


@dataclass(frozen=True)
class WorkerExit:
    """How a worker process ended, in words a user can act on."""

    returncode: int
    cause: str  # a signal name (SIGSEGV), "exit", or the supervisor's reason ("timeout", "memory")
    description: str  # "SIGSEGV", "exit code 3", "stopped: memory 612 MB over the 500 MB limit"


def exit_description(returncode: int) -> tuple[str, str]:
    """(cause, description) for a return code: -11 → ("SIGSEGV", "SIGSEGV"), 3 → ("exit", "exit code 3")."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return name, name
    return "exit", f"exit code {returncode}"


class WorkerProcess:
    """One worker process of one model; ``slot`` is its number within the model (1, 2, …)."""

    def __init__(
        self,
        spec: WorkerSpec,
        slot: int,
        env: dict[str, str] | None = None,
        on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
        on_part: Callable[[WorkerProcess, Any, int, InferenceResponse], None] | None = None,
    ) -> None:
        self.spec = spec
        self.slot = slot
        self.env = env
        self.on_metrics = on_metrics  # receives what the handler reported through context.metrics
        self.on_part = on_part  # each intermediate answer of a streaming handler (``streams.py``)
        self.streamed = False  # the batch now (or last) run streamed: it sent parts, or ended some
        self.ended: Sequence[int] = ()  # its requests whose stream was over before its answers frame
        self.batch_id = 0  # the batch it runs now (or ran last)
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.started_at = time.time()
        self.load_time_s: float | None = None
        self.device: str | None = None  # where its handler put the model, as it said when ready
        self.holding = 0  # requests of the batch it has taken (0 when idle)
        self.kill_reason: tuple[str, str] | None = None  # (cause, description) when the supervisor kills
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lifeline: int | None = None
        self._pumps: list[asyncio.Task] = []
        self.output: WorkerOutput | None = None  # its stdout and stderr, read all the time
        self._watcher: asyncio.Task | None = None
        self._exit: asyncio.Future[WorkerExit] | None = None
        self._batches = 0

    @property
    def name(self) -> str:
        return f'worker {self.slot} of model "{self.spec.model}"'

    @property
    def exited(self) -> asyncio.Future[WorkerExit]:
        assert self._exit is not None, "start() first"
        return self._exit

    # ---- life ----------------------------------------------------------------------------------
    async def start(self, timeout_s: float) -> None:
        """Spawn the process and wait until its handler is initialized (WorkerStartError if not)."""
        self._exit = asyncio.get_running_loop().create_future()
        ours = await self._spawn()
        await self._attach(ours)
        started = time.perf_counter()
        frame = await self._handshake(timeout_s)
        self.load_time_s = time.perf_counter() - started
        self.device = frame.header.get("device") if isinstance(frame.header.get("device"), str) else None
        self.state = WorkerState.IDLE

    async def _spawn(self) -> socket.socket:
        """Start the process with its end of a socket pair and a lifeline pipe; return our end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        life_read, life_write = os.pipe()
        self._lifeline = life_write
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.spec.python,
                "-m",
                "archiver.serving.worker.main",
                str(theirs.fileno()),
                str(life_read),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(), life_read),
                # Its own session: a Ctrl-C in the terminal reaches the server, which drains and then
                # ends its workers in order, instead of killing every worker mid-batch.
                start_new_session=True,
                env=self.env,
            )
        except OSError as exc:
            ours.close()
            os.close(life_write)
            self._lifeline = None
            self.state = WorkerState.DEAD
            raise WorkerStartError(f"cannot start {self.name}: {exc.strerror}") from exc
        finally:
            theirs.close()
            os.close(life_read)
        self.pid = self._proc.pid
        return ours

    async def _attach(self, ours: socket.socket) -> None:
        """Connect to the spawned process and start reading its output and watching for its end."""
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self.output = WorkerOutput(f"[{self.spec.model} w{self.slot} pid {self.pid}] ")
        self._pumps = [
            loop.create_task(self.output.pump(self._proc.stdout, keep_tail=False)),
            loop.create_task(self.output.pump(self._proc.stderr, keep_tail=True)),
        ]
        self._watcher = loop.create_task(self._watch())  # held: the loop keeps only weak references

    async def _handshake(self, timeout_s: float) -> wire.Frame:
        """Send the init frame and wait for "ready" (WorkerStartError for anything else, or none)."""
        assert self._reader is not None and self._writer is not None
        init = {
            "source": self.spec.source,
            "name": self.spec.model,
            "cache_dir": self.spec.cache_dir,
            "batch_size": self.spec.batch_size,
            "threads": self.spec.threads,
            "gpu_id": self.spec.gpu_id,
            "signed_sha256": self.spec.signed_sha256,
        }
        try:
            self._writer.writelines(wire.frame_chunks("init", init))
            await self._writer.drain()
            frame = await asyncio.wait_for(wire.read_frame_async(self._reader), timeout_s)
        except TimeoutError:
            self.kill("timeout", f"not ready within {timeout_s:g} s")
            raise WorkerStartError(
                f"{self.name} did not finish loading within {timeout_s:g} s (startupTimeout); it was stopped",
                cause="timeout",
            ) from None
        except (ConnectionError, wire.WireError):
            frame = None
        if frame is None:
            ended = await self._ended()
            raise WorkerStartError(self.death_message(ended, while_doing="while loading"), cause=ended.cause)
        if frame.kind == "load_failed":
            await self.stop(grace_s=2.0)
            raise WorkerStartError(str(frame.header.get("message") or "the handler failed to load"))
        if frame.kind != "ready":
            self.kill("exit", f"sent {frame.kind!r} instead of ready")
            raise WorkerStartError(f"{self.name} answered its start with {frame.kind!r}", cause="exit")
        return frame

    async def _watch(self) -> None:
        """Wait for the process to end, then record how (the one place that sets ``exited``)."""
        assert self._proc is not None and self._exit is not None
        returncode = await self._proc.wait()
        # Let the pipes drain so the last stderr lines are in the tail before anyone reads it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._pumps, return_exceptions=True), 1.0)
        self.state = WorkerState.DEAD
        self._close_handles()
        # asyncio leaves a subprocess transport open until closed by hand; closed later, after the
        # loop itself, it complains. Process exposes no close of its own.
        transport = getattr(self._proc, "_transport", None)
        if transport is not None:
            transport.close()
        cause, description = exit_description(returncode)
        if self.kill_reason is not None:
            cause, description = self.kill_reason
        if not self._exit.done():
            self._exit.set_result(WorkerExit(returncode, cause, description))

    async def _ended(self) -> WorkerExit:
        """The process's end after its socket closed: wait briefly, then make sure it is gone."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), 3.0)
        except TimeoutError:
            # It closed its socket but lives on (a handler that closed fds): it is of no use now.
            self.kill("exit", "closed its connection to the server")
            return await asyncio.shield(self.exited)

    def kill(self, cause: str, description: str) -> None:
        """End the process now (SIGKILL); ``exited`` will report ``cause`` and ``description``."""
        if self.kill_reason is None:
            self.kill_reason = (cause, description)
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def stop(self, grace_s: float = 10.0) -> WorkerExit | None:
        """Ask the worker to end (its socket closes after its current batch), kill it after ``grace_s``."""
        if self._proc is None or self._exit is None:
            return None
        if self.state != WorkerState.DEAD:
            self.state = WorkerState.STOPPING
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        try:
            return await asyncio.wait_for(asyncio.shield(self._exit), grace_s)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            return await asyncio.shield(self._exit)

    def _close_handles(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        if self._lifeline is not None:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = None

    # ---- work ----------------------------------------------------------------------------------
    async def run(
        self,
        requests: list[wire.RawRequest],
        timeout_s: float | None,
        threads: int | None = None,
        *,
        tag: Any = None,
    ) -> list[InferenceResponse]:
        """Hand one batch to the process and await its answers (run with ``threads`` torch threads).
        A streaming handler's intermediate answers go to ``on_part`` with ``tag`` (``streams.py``).

        Raises WorkerGoneError if the process ended before it took the batch (nothing ran),
        WorkerDiedError if it ended while holding it or broke the protocol, and TimeoutError after
        ``timeout_s`` (the caller decides the worker's fate).
        """
        assert self._reader is not None and self._writer is not None
        self._batches += 1
        self.batch_id = batch_id = self._batches
        self.state = WorkerState.BUSY
        self.streamed = False
        frame: wire.Frame | None = None
        try:
            async with asyncio.timeout(timeout_s) as clock:
                taken = await self._send_and_read(wire.batch_frame(batch_id, requests, threads))
                if taken is not None:
                    self._expect(taken, "taken", batch_id)
                    # Set until the answers are in: if the worker ends meanwhile, its death message
                    # names the batch it held.
                    self.holding = len(requests)
                    frame = await self._read()
                    if frame is not None and frame.kind == "parts":
                        frame = await route_parts(self, self._read, frame, (requests, tag, timeout_s), clock)
        except wire.WireError as exc:
            self.kill("exit", f"broke the protocol ({exc})")
            raise WorkerDiedError(self.death_message(await self._ended())) from None
        if frame is None:
            ended = await self._ended()
            if not self.holding:
                raise WorkerGoneError(self.death_message(ended))
            raise WorkerDiedError(self.death_message(ended))
        try:
            self._expect(frame, "answers", batch_id)
            answered, responses = wire.read_answers(frame)
            if len(responses) != len(requests):
                raise wire.WireError(f"{len(responses)} answers for a batch of {len(requests)}")
            self.ended = wire.ended_rows(frame, len(requests))
        except wire.WireError as exc:
            self.kill("exit", f"broke the protocol ({exc})")
            raise WorkerDiedError(self.death_message(await self._ended())) from None
        if self.state == WorkerState.BUSY:
            self.state = WorkerState.IDLE
        self.holding = 0
        records = frame.header.get("metrics")
        if records and self.on_metrics is not None:
            self._report_metrics(records)
        return responses

    def cancel(self, batch_id: int, index: int) -> None:
        """Cancel request ``index`` of batch ``batch_id`` if the process still runs it (its client left)."""
        if self.holding and batch_id == self._batches and self._writer is not None:
            with contextlib.suppress(Exception):  # it is gone: the batch's end says so
                self._writer.writelines(wire.cancel_frame(batch_id, index))

    def _report_metrics(self, records: Any) -> None:
        """Hand the batch's handler metrics on; they are the handler's data, checked by the receiver."""
        assert self.on_metrics is not None
        try:
            self.on_metrics(records if isinstance(records, list) else [records])
        except Exception:  # noqa: BLE001 - metrics never fail the batch they came with
            log.exception("%s: its handler metrics could not be recorded", self.name)

    async def _send_and_read(self, chunks: list[bytes]) -> wire.Frame | None:
        assert self._writer is not None
        try:
            self._writer.writelines(chunks)
            await self._writer.drain()
        except ConnectionError:
            pass  # it is gone; reading says so
        return await self._read()

    async def _read(self) -> wire.Frame | None:
        """The next frame, or None when the process has closed its end (it ended)."""
        assert self._reader is not None
        try:
            return await wire.read_frame_async(self._reader)
        except ConnectionError:
            return None

    @staticmethod
    def _expect(frame: wire.Frame, kind: str, batch_id: int) -> None:
        if frame.kind != kind or frame.header.get("batch") != batch_id:
            raise wire.WireError(f"expected {kind} of batch {batch_id}, got {frame.kind!r}")

    def death_message(self, ended: WorkerExit, while_doing: str | None = None) -> str:
        """'worker 2 of model "m" died (SIGSEGV) while handling a batch of 3; its last stderr lines: …'."""
        doing = while_doing or (f"while handling a batch of {self.holding}" if self.holding else "while idle")
        verb = "was stopped" if self.kill_reason is not None else "died"
        message = f"{self.name} {verb} ({ended.description}) {doing}"
        lines = crash_lines(list(self.output.stderr_tail)) if self.output is not None else []
        if lines:  # quoted to clients: files by their name only (the log has the lines whole)
            message += "; its last stderr lines: " + redact_paths(" | ".join(lines))
        return message

    # ---- observation ---------------------------------------------------------------------------
    def rss_bytes(self) -> int | None:
        """Resident memory of the process (Linux /proc; None elsewhere or once it is gone)."""
        if self.pid is None or self.state == WorkerState.DEAD:
            return None
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as stream:
                return int(stream.read().split()[1]) * _PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return None

    def describe(self) -> dict[str, Any]:
        rss = self.rss_bytes()
        return {
            "id": str(self.slot),
            "pid": self.pid,
            "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "status": self.state.value,
            "memoryUsage": rss,
            "rssMB": round(rss / 2**20, 1) if rss is not None else None,
            "loadTimeSeconds": self.load_time_s,
            "gpu": self.spec.gpu_id is not None,
        }
