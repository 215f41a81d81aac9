"""gRPC health checking (``grpc.health.v1.Health``) for load balancers and kubelet gRPC probes.

Open to calls without a token, as ``/ping`` is. The whole server ("") and each inference service are
SERVING once the models loaded at startup are (``ModelHost.server_ready``, ``/v2/health/ready``'s
rule), NOT_SERVING before; the management service is SERVING while the server runs; any other name is
NOT_FOUND, as the protocol asks. Watch sends the status, then each change, until the client leaves or
the server stops.
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
    """Check and Watch over ``ready`` (the inference side's readiness) for the services ``served``."""

    def __init__(self, ready: Callable[[], bool], inference: list[str], always: list[str]) -> None:
        self.ready, self.inference, self.always = ready, {"", *inference}, set(always)
        self.Response = message("grpc.health.v1.HealthCheckResponse")

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

    async def watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            last = self._status(request.service)
        except ModelNotFoundError:
            last = self.Response.ServingStatus.Value("SERVICE_UNKNOWN")
            yield self.Response(status=last)
            return
        yield self.Response(status=last)
        while True:
            await asyncio.sleep(_WATCH_POLL_S)
            now = self._status(request.service)
            if now != last:
                last = now
                yield self.Response(status=now)
