"""gRPC health checking (``grpc.health.v1.Health``) for load balancers and kubelet gRPC probes.

Open to calls without a token, as ``/ping`` is. The whole server ("") and each inference service are
SERVING once the models loaded at startup are (``ModelHost.server_ready``, ``/v2/health/ready``'s
rule), NOT_SERVING before; the management service is SERVING while the server runs; any other name is
NOT_FOUND, as the protocol asks. Watch sends the status, then each change, until the client leaves or
the server stops; one shared poll finds the changes for all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from archiver.errors import ModelNotFoundError
from archiver.serving.front.grpc_api.messages import message

_WATCH_POLL_S = 0.5


class HealthService:
    """Check and Watch over ``ready`` (the inference side's readiness) for the services ``served``.

    One poll of ``ready`` serves every Watch call (a change wakes them all), so open Watch calls cost
    the event loop nothing between changes."""

    def __init__(self, ready: Callable[[], bool], inference: list[str], always: list[str]) -> None:
        self.ready, self.inference, self.always = ready, {"", *inference}, set(always)
        self.Response = message("grpc.health.v1.HealthCheckResponse")
        self._watchers = 0
        self._poller: asyncio.Task[None] | None = None
        self._change: asyncio.Future[None] | None = None  # resolved when ``ready`` next changes

    def implementations(self) -> dict[str, Any]:
        return {"Check": self.check, "Watch": self.watch}

    def _status(self, service: str) -> int:
        statuses = self.Response.ServingStatus
        if service in self.always:
            return statuses.Value("SERVING")
        if service in self.inference:
            return statuses.Value("SERVING" if self.ready() else "NOT_SERVING")
        raise ModelNotFoundError(f"unknown service {service!r}")

    async def check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.Response(status=self._status(request.service))

    def _next_change(self) -> asyncio.Future[None]:
        if self._change is None:
            self._change = asyncio.get_running_loop().create_future()
        return self._change

    async def _poll(self) -> None:
        """Poll ``ready`` while anyone watches; each change resolves the future the watchers wait on."""
        last = self.ready()
        while self._watchers:
            await asyncio.sleep(_WATCH_POLL_S)
            now = self.ready()
            if now != last:
                last = now
                change, self._change = self._change, None
                if change is not None:
                    change.set_result(None)

    async def watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            last = self._status(request.service)
        except ModelNotFoundError:
            last = self.Response.ServingStatus.Value("SERVICE_UNKNOWN")
            yield self.Response(status=last)
            return
        yield self.Response(status=last)
        self._watchers += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll())
        try:
            while True:
                change = self._next_change()  # taken before the status is read: no change is missed
                now = self._status(request.service)
                if now != last:
                    last = now
                    yield self.Response(status=now)
                await asyncio.shield(change)  # shielded: one watcher leaving cancels nobody else's wait
        finally:
            self._watchers -= 1
