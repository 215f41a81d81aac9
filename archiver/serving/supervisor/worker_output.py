"""A worker's output: read all the time, logged within a budget, its stderr tail kept for its death.

A handler printing megabytes never blocks on a full pipe, and never floods the server's log: lines
go to the log (prefixed with model, worker and PID) within a token bucket, and the excess is counted,
not stored. The last stderr lines explain a death; when the worker crashed in native code, the part
of faulthandler's dump that says where (the fatal error and the innermost frames) is what is quoted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

log = logging.getLogger("archiver.worker")

_STDERR_TAIL_LINES = 60  # enough for a faulthandler dump of a deep stack
_LINE_LIMIT = 2000  # characters of one output line that reach the log
# Output lines a worker may log: a burst of this many, refilled at this rate per second.
_LOG_BURST_LINES = 2000
_LOG_LINES_PER_S = 200.0


def crash_lines(tail: list[str], most: int = 6) -> list[str]:
    """The stderr lines that explain a death: the fatal error and the innermost frames of a
    faulthandler dump when there is one (where the handler crashed), else the last lines."""
    lines = [line.strip() for line in tail if line.strip()]
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
    if fatal:
        start = fatal[-1]
        frames = [line for line in lines[start + 1 :] if line.startswith("File ")]
        return [lines[start], *frames[: most - 1]]
    return [line for line in lines if not line.startswith("Extension modules:")][-most:]


class OutputBudget:
    """A token bucket over output lines, so a chatty handler cannot flood the server's log."""

    def __init__(self) -> None:
        self.tokens = float(_LOG_BURST_LINES)
        self.stamp = time.monotonic()
        self.dropped = 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(_LOG_BURST_LINES, self.tokens + (now - self.stamp) * _LOG_LINES_PER_S)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


class WorkerOutput:
    """The stdout and stderr of one worker process."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self._budget = OutputBudget()

    async def pump(self, stream: asyncio.StreamReader | None, keep_tail: bool) -> None:
        """Read one pipe to its end: lines to the log within the budget, the tail kept if asked."""
        if stream is None:
            return
        partial = b""
        prefix = self.prefix
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            if len(partial) > _LINE_LIMIT:  # a line without end: cut it here
                lines.append(partial)
                partial = b""
            self._emit(lines, keep_tail)
        if partial:
            self._emit([partial], keep_tail)
        if self._budget.dropped:
            dropped = self._budget.dropped
            log.warning("%s%d output lines not logged (over %g lines/s)", prefix, dropped, _LOG_LINES_PER_S)

    def _emit(self, lines: list[bytes], keep_tail: bool) -> None:
        for raw in lines:
            text = raw[:_LINE_LIMIT].decode("utf-8", "replace").rstrip("\r")
            if keep_tail:
                self.stderr_tail.append(text)
            if self._budget.take():
                log.info("%s%s", self.prefix, text)
