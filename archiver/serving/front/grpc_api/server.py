"""The two gRPC servers of the front process, on its own event loop (grpc.aio): inference and management.

The inference port (TorchServe's 7070) serves TorchServe's InferenceAPIsService and the Open Inference
Protocol's GRPCInferenceService (under KServe's and Triton's name, and under TorchServe's); the
management port (7071) TorchServe's ManagementAPIsService. Both serve health checking and reflection
(from our own descriptor pool, so ``grpcurl list`` and ``grpcurl describe`` work), take the HTTP
server's token, refuse a message past the server's ``max_request_size`` (RESOURCE_EXHAUSTED), and bound
the calls in flight. Host and Origin rules do not apply here: a browser cannot speak native gRPC (it
needs a grpc-web proxy, whose own origin rules do).
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection

from archiver.errors import UsageError
from archiver.serving.front.grpc_api import messages
from archiver.serving.front.grpc_api.admission import Admission
from archiver.serving.front.grpc_api.calls import Observe, rpc_handlers
from archiver.serving.front.grpc_api.health import HealthService
from archiver.serving.front.grpc_api.management import ManagementService
from archiver.serving.front.grpc_api.open_inference import OpenInferenceService
from archiver.serving.front.grpc_api.torchserve import InferenceService
from archiver.serving.protocols import router
from archiver.serving.supervisor.registry import ModelRegistry

# Calls with the token one server runs at once; past it a call gets RESOURCE_EXHAUSTED at once (the
# models' own queues bound the work behind them: a full queue is UNAVAILABLE, as HTTP's 503). The calls
# that need no token have their own caps on top (admission.py), so they never take these slots.
MAX_CONCURRENT_RPCS = 4096
_PROBES = frozenset({"Ping", "ServerLive", "ServerReady"})
# A connection with no call for this long is closed (its client reconnects when it next calls).
_CONNECTION_IDLE_MS = 300_000


def _options(max_message: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ("grpc.max_connection_idle_ms", _CONNECTION_IDLE_MS),
    ]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServers:
    """The inference and management gRPC servers (either may be off: its port None)."""

    def __init__(
        self,
        registry: ModelRegistry,
        host: router.ModelHost,
        *,
        token: str | None,
        max_request_size: int,
        max_request_items: int,
        observe: Observe,
        first_message_s: float = 15.0,
        stream_idle_s: float = 120.0,
    ) -> None:
        self.registry, self.host, self.token = registry, host, token
        # how long a call without the token may wait for its message; a bidirectional stream for its
        # next one while nothing of it is in flight
        self.first_message_s, self.stream_idle_s = first_message_s, stream_idle_s
        self.max_request_size, self.max_request_items, self.observe = (
            max_request_size,
            max_request_items,
            observe,
        )
        self.ports: dict[str, int] = {}
        self._servers: list[grpc.aio.Server] = []

    def _server(
        self, bind: str, port: int, services: dict[str, grpc.GenericRpcHandler]
    ) -> tuple[grpc.aio.Server, int]:
        inference = [name for name in services if name != messages.TORCHSERVE_MANAGEMENT]
        watch = f"/{messages.HEALTH}/Watch"
        open_methods = {f"/{messages.HEALTH}/Check", watch}
        for name in inference:
            open_methods.update(
                f"/{name}/{m.name}" for m in messages.service(name).methods if m.name in _PROBES
            )
        admission = Admission(self.token, frozenset(open_methods), frozenset({watch}), self.first_message_s)
        server = grpc.aio.server(
            options=_options(self.max_request_size),
            interceptors=(admission,),
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS + admission.calls.cap + admission.streams.cap,
        )
        server.add_generic_rpc_handlers(tuple(services.values()))
        always = [name for name in services if name == messages.TORCHSERVE_MANAGEMENT]
        health = HealthService(self.host.server_ready, inference, always)
        server.add_generic_rpc_handlers(
            (rpc_handlers(messages.HEALTH, health.implementations(), None, frozenset({"Check", "Watch"})),)
        )
        names = [*services, messages.HEALTH, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server, pool=messages.pool())
        try:
            bound = server.add_insecure_port(_address(bind, port))
        except RuntimeError:
            bound = 0
        if not bound:
            raise UsageError(
                f"cannot listen on {bind}:{port} for gRPC: the port is taken or the address is not ours"
            )
        return server, bound

    async def start(self, bind: str, inference_port: int | None, management_port: int | None) -> None:
        """Bind and start each server whose port is not None (0 picks a free port)."""
        token = self.token
        planned = []
        if inference_port is not None:
            idle_s, size = self.stream_idle_s, self.max_request_size
            ts = InferenceService(self.host, self.max_request_items, self.observe, idle_s)
            oip = OpenInferenceService(self.host, self.max_request_items, self.observe, size, idle_s)
            services = {
                messages.TORCHSERVE_INFERENCE: rpc_handlers(
                    messages.TORCHSERVE_INFERENCE, ts.implementations(), token, _PROBES
                ),
            }
            for name in (
                messages.OPEN_INFERENCE,
                messages.TORCHSERVE_OPEN_INFERENCE,
            ):  # one service, two names
                services[name] = rpc_handlers(name, oip.implementations(), token, _PROBES)
            planned.append(("grpc", inference_port, services))
        if management_port is not None:
            management = ManagementService(self.registry)
            handler = rpc_handlers(messages.TORCHSERVE_MANAGEMENT, management.implementations(), token)
            planned.append(("grpc_management", management_port, {messages.TORCHSERVE_MANAGEMENT: handler}))
        try:
            for which, port, services in planned:
                server, bound = self._server(bind, port, services)
                self._servers.append(server)
                self.ports[which] = bound
            for server in self._servers:
                await server.start()
        except BaseException:
            await self.stop(0)  # a port already bound is let go
            raise

    async def stop(self, grace_s: float) -> None:
        """Stop taking calls; the calls in flight get ``grace_s`` seconds to finish."""
        servers, self._servers = self._servers, []
        for server in servers:
            await server.stop(grace_s)


async def start_grpc(server: Any) -> GrpcServers:
    """The gRPC servers of a ``front.server.Server`` on its settings' ports, started; their bound ports
    join ``server.ports`` (``grpc``, ``grpc_management``), as the HTTP ports are listed there."""
    from archiver.serving.front.inference_routes import RegistryHost

    settings = server.settings
    servers = GrpcServers(
        server.registry,
        RegistryHost(server.registry),
        token=settings.token or None,
        max_request_size=settings.max_request_size,
        max_request_items=settings.max_request_items,
        observe=server.metrics.observe_request,
        first_message_s=settings.idle_timeout_s,
        stream_idle_s=settings.defaults.response_timeout_s,
    )
    await servers.start(settings.host, settings.grpc_port, settings.grpc_management_port)
    server.ports.update(servers.ports)
    return servers
