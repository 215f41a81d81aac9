"""The event loop the server runs on: uvloop's when installed, so the front's sockets and timers run in C."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed (it is a dependency), else asyncio's.

    uvloop runs the sockets, timers and callbacks in C: on the tiny model it cuts the front's own
    cost per request by about a fifth (docs/performance.md). ``MODEL_ARCHIVER_EVENT_LOOP=asyncio``
    picks asyncio's loop anyway, to tell a uvloop problem from ours.
    """
    if os.environ.get("MODEL_ARCHIVER_EVENT_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the server's event loop (``new_event_loop``)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
