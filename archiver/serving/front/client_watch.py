"""Cancels a request's work when its client goes away before the answer: aiohttp runs a handler to its end
otherwise (its handler cancellation is off), so a request nobody will read would keep its place in the
queue, or its worker (a streaming handler's for as long as it streams).

The connection is looked at every ``POLL_S`` by one timer per request (no task of its own); a closed one
cancels the awaited work, whose request the batcher then drops (still queued) or the supervisor cancels
in its worker (running: the handler's next send raises).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

# How often a request still waiting looks whether its client is there (as a silent stream does).
POLL_S = 0.25

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer; the work for it was cancelled."""


async def while_connected(request: web.Request, work: Awaitable[T]) -> T:
    """``work``'s result; ClientGone (and ``work`` cancelled) once ``request``'s connection closes."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone = False

    def look() -> None:
        nonlocal gone, timer
        transport = request.transport
        if transport is None or transport.is_closing():
            gone = True
            task.cancel()
        else:
            timer = loop.call_later(POLL_S, look)

    timer = loop.call_later(POLL_S, look)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:  # ours, not the server's shutdown
            raise ClientGone from None
        raise
    finally:
        timer.cancel()
