"""Cancels a request's work when its client goes away before the answer: aiohttp runs a handler to its end
otherwise (its handler cancellation is off), so a request nobody will read would keep its place in the
queue, or its worker (a streaming handler's for as long as it streams).

One timer per event loop looks at every waiting request's connection each ``POLL_S`` (a sweep); a closed
one cancels the awaited work, whose request the batcher then drops (still queued) or the supervisor
cancels in its worker (running: the handler's next send raises). Per request this is a dict entry added
and removed: a timer per request cost a handle and a closure each, and the closure (which re-armed itself
by its own name, a reference cycle) kept the whole finished request (its Request, Task, writer, Response)
alive until the garbage collector found it, which was most of the front's added CPU per request.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

# How often a request still waiting looks whether its client is there (as a silent stream does).
POLL_S = 0.25

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer; the work for it was cancelled."""


class _Sweep:
    """The requests one event loop is waiting on, looked at together every ``POLL_S`` while any wait."""

    __slots__ = ("cancelled", "loop", "timer", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: dict[asyncio.Task, web.Request] = {}
        self.cancelled: set[asyncio.Task] = set()  # cancelled by a sweep, not yet seen by their wait
        self.timer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task, request: web.Request) -> None:
        self.waiting[task] = request
        if self.timer is None:
            self.timer = self.loop.call_later(POLL_S, self.look)

    def look(self) -> None:
        self.timer = None
        for task, request in list(self.waiting.items()):
            transport = request.transport
            if transport is None or transport.is_closing():
                del self.waiting[task]
                self.cancelled.add(task)
                task.cancel()
        if self.waiting:
            self.timer = self.loop.call_later(POLL_S, self.look)


_sweeps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweep] = weakref.WeakKeyDictionary()


async def while_connected(request: web.Request, work: Awaitable[T]) -> T:
    """``work``'s result; ClientGone (and ``work`` cancelled) once ``request``'s connection closes."""
    task = asyncio.current_task()
    assert task is not None
    loop = task.get_loop()
    sweep = _sweeps.get(loop)
    if sweep is None:
        sweep = _sweeps[loop] = _Sweep(loop)
    sweep.add(task, request)
    try:
        return await work
    except asyncio.CancelledError:
        if task in sweep.cancelled and task.uncancel() == 0:  # ours, not the server's shutdown
            raise ClientGone from None
        raise
    finally:
        sweep.waiting.pop(task, None)
        sweep.cancelled.discard(task)
