"""What every fast-lane connection of one inference port shares (``fast_lane.py``): the host, metrics
and limits, the sweep that times out idle connections and late bodies, and the cached Date header;
and whether the lane is on at all."""

from __future__ import annotations

import asyncio
import os
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.front.metrics import ServerMetrics

if TYPE_CHECKING:
    from archiver.serving.front.fast_lane import LaneConnection

# The largest body the lane holds itself; a bigger one streams through aiohttp under the same limits.
BODY_MAX = 4 * 1024 * 1024
# How often the lane looks for idle connections and bodies that have not come.
SWEEP_S = 1.0


class Lane:
    """What every fast-lane connection of one inference port shares."""

    def __init__(
        self,
        host: Any,
        metrics: ServerMetrics,
        limits: HttpLimits,
        open_paths: frozenset[str],
        idle_timeout_s: float = 15.0,
    ) -> None:
        self.host, self.metrics, self.limits, self.open_paths = host, metrics, limits, open_paths
        self.idle_timeout_s = idle_timeout_s
        self.body_max = min(BODY_MAX, limits.max_request_size)
        self.connections: set[LaneConnection] = set()
        # requests the lane took, and connections it handed to aiohttp (tests and diagnosis read them)
        self.taken = 0
        self.handed = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._date_second = -1
        self._date = ""

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_second:
            self._date_second, self._date = now, formatdate(now, usegmt=True)
        return self._date

    def add(self, conn: LaneConnection) -> None:
        self.connections.add(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for conn in list(self.connections):
            conn.look(now)
        if self.connections:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)


def fast_lane_on() -> bool:
    """The lane is on unless ``MODEL_ARCHIVER_FAST_LANE=0``: every request then goes through aiohttp, to
    tell a lane problem from another (as ``MODEL_ARCHIVER_EVENT_LOOP=asyncio`` does for uvloop)."""
    return os.environ.get("MODEL_ARCHIVER_FAST_LANE", "1").strip() not in ("0", "off", "false", "no")
