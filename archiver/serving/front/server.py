"""The front process: binds the three ports, starts each model's workers, drains in-flight work on stop.

``Server`` is the asyncio object (start, stop; ``serve`` is its whole life as ``model-archiver serve``
runs it, until SIGINT or SIGTERM); ``ServerThread`` runs one on its own event loop in a
background thread, for tests and build scripts that want a live server inside the current process. In
both, handlers run in worker processes (``pool.py``); this process never imports torch or a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from archiver.errors import UsageError
from archiver.serving.front.app import LANE_KEY, inference_app, management_app, metrics_app
from archiver.serving.front.event_loop import new_event_loop
from archiver.serving.front.fast_lane_port import Lane, fast_lane_on
from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.front.metrics import ServerMetrics
from archiver.serving.front.parse_errors import JsonErrorRunner
from archiver.serving.front.site_guard import SiteRules
from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_ITEMS, DEFAULT_MAX_REQUEST_SIZE
from archiver.serving.supervisor.devices import server_gpus
from archiver.serving.supervisor.registry import ModelEntry, ModelRegistry, ModelSettings
from archiver.serving.supervisor.signature_gate import SignatureGate
from archiver.serving.supervisor.states import ModelState


@dataclass
class ServerSettings:
    """Everything one server needs; ``operator`` holds the per-model settings the operator set."""

    host: str = "127.0.0.1"
    port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    model_store: Path | None = None
    # (name or None, archive path) for each model to load at start.
    models: list[tuple[str | None, Path]] = field(default_factory=list)
    defaults: ModelSettings = field(default_factory=ModelSettings)
    operator: dict[str, Any] = field(default_factory=dict)
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    token: str | None = None
    no_auth: bool = False
    # Without a token: host names (Host header) and web origins (Origin header) answered besides the
    # server's own; "*" turns that check off (site_guard.py).
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    cache_dir: Path | None = None
    # A connection that has not sent a complete request line and headers by then is closed.
    idle_timeout_s: float = 15.0
    body_read_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    # torch intra-op threads per worker; None: the cores divided by all workers of all models.
    torch_threads: int | None = None
    # Install each archive's requirementsFile into a cached virtual environment for its workers.
    install_model_deps: bool = False
    # The most workers one model may run (register, scale, model-config.yaml); None: 4 per core.
    max_workers_per_model: int | None = None
    # v1 instances, v2 input tensors or form fields one request may carry (request_bounds.py).
    max_request_items: int = DEFAULT_MAX_REQUEST_ITEMS
    # Public keys (signing_keys.read_trusted_keys): when set, only archives one of them signed load.
    trusted_keys: tuple[Any, ...] = ()
    # The GPUs workers are placed on: None or "all" (every one found), "none", or indices "0,2";
    # number_of_gpu (TorchServe's key) keeps the first N found (devices.py, placement.py).
    gpus: str | int | list[int] | None = None
    number_of_gpu: int | None = None
    # gRPC (grpc_api/): the inference and management ports; None: off (``serve`` sets 7070 and 7071).
    grpc_port: int | None = None
    grpc_management_port: int | None = None
    grpc_defaulted: tuple[str, ...] = ()  # the gRPC ports nobody named: serve turns them off if taken
    # serve --ts-config: per-model defaults from its models= JSON (name -> version -> ModelSettings
    # fields, under each archive's model-config.yaml; "*" -> "*": the file's defaults for every model,
    # which the registry counts as the operator's choice of workers), its metrics.yaml
    # (ts_metrics_config.MetricsConfig; None: TorchServe's default), whether undeclared handler metrics
    # get TorchServe's names too (model_metrics_auto_detect), the host gauges (disable_system_metrics),
    # and what it ignored.
    model_defaults: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    metrics_config: Any = None
    model_metrics_auto_detect: bool = False
    system_metrics: bool = True
    startup_notes: list[str] = field(default_factory=list)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: ServerSettings) -> str | None:
    """Refuse a non-loopback bind without a token or --no-auth; return a warning to print, if any."""
    if settings.token or is_loopback(settings.host):
        return None
    if settings.no_auth:
        return (
            f"WARNING: serving on {settings.host} without authentication (--no-auth): anyone who can reach "
            "this address can run predictions and register or remove models"
        )
    raise UsageError(
        f"binding {settings.host} exposes the server beyond this machine: set --token (or "
        "MODEL_ARCHIVER_TOKEN) so requests must carry 'Authorization: Bearer <token>', or pass --no-auth"
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Server:
    """The three HTTP apps over one model registry."""

    def __init__(self, settings: ServerSettings) -> None:
        check_exposure(settings)
        self.settings = settings
        gpus = server_gpus(settings.gpus, settings.number_of_gpu)
        self.metrics = ServerMetrics(
            lambda: self.registry.snapshot(),
            ts_config=settings.metrics_config,
            model_metrics_auto_detect=settings.model_metrics_auto_detect,
            system_metrics=settings.system_metrics,
        )
        self.registry = ModelRegistry(
            model_store=settings.model_store,
            defaults=settings.defaults,
            operator=settings.operator,
            cache_dir=settings.cache_dir,
            batch_observer=self.metrics.batch_observer,
            death_counter=self.metrics.count_worker_death,
            torch_threads=settings.torch_threads,
            install_model_deps=settings.install_model_deps,
            max_workers_per_model=settings.max_workers_per_model,
            handler_metrics=self.metrics.observe_handler_metrics,
            signatures=SignatureGate(settings.trusted_keys, self.metrics.count_signature_refusal),
            gpus=gpus,
        )
        self.registry.model_defaults = settings.model_defaults
        if self.registry.gpu_monitor is not None:
            self.metrics.watch_gpus(self.registry.gpu_monitor, self.registry.gpu_workers)
        self.limits = HttpLimits(
            max_request_size=settings.max_request_size,
            body_read_timeout_s=settings.body_read_timeout_s,
            max_request_items=settings.max_request_items,
            token=settings.token or None,
            site=SiteRules.build(settings.host, settings.allowed_hosts, settings.allowed_origins),
        )
        self.ports: dict[str, int] = {}
        self._runners: list[web.AppRunner] = []
        self._grpc: Any = None
        self.lane: Lane | None = None  # the inference port's fast lane (fast_lane.py), unless turned off

    def url(self, which: str = "inference") -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.ports[which]}"

    async def start(self, load_models: bool = True) -> None:
        """Bind every port (0 picks a free one), then load the startup models."""
        apps = {
            "inference": (inference_app, self.settings.port),
            "management": (management_app, self.settings.management_port),
            "metrics": (metrics_app, self.settings.metrics_port),
        }
        self.registry.listing_startup_models = bool(self.settings.models)
        socks = {which: _bind(self.settings.host, port) for which, (_, port) in apps.items()}
        for which, (factory, _) in apps.items():
            app = factory(self.registry, self.metrics, self.limits)
            lane = app.get(LANE_KEY) if fast_lane_on() else None
            if lane is not None:
                lane.idle_timeout_s = self.settings.idle_timeout_s
                self.lane = lane
            runner = JsonErrorRunner(
                app,
                lane=lane,
                access_log=None,
                handle_signals=False,
                keepalive_timeout=self.settings.idle_timeout_s,
                shutdown_timeout=self.settings.drain_timeout_s,
            )
            await runner.setup()
            await web.SockSite(runner, socks[which]).start()
            self._runners.append(runner)
            self.ports[which] = socks[which].getsockname()[1]
        if self.settings.grpc_port is not None or self.settings.grpc_management_port is not None:
            from archiver.serving.front.grpc_api.server import start_grpc  # grpcio only when asked for

            self._grpc = await start_grpc(self)  # its ports join self.ports
        if load_models:
            await self.load_startup_models()

    async def load_startup_models(self) -> list[ModelEntry]:
        """List every startup model (LOADING), then start all their workers at once."""
        return await self.start_models(await self.list_startup_models())

    async def list_startup_models(self) -> list[ModelEntry]:
        """Read each startup archive's head and list it as LOADING (cheap: no process starts yet), so
        the management API shows every model from the first moment, and each worker's thread count
        knows all the workers to come."""
        try:
            return [
                await self.registry.prepare(path, name=name, startup=True)
                for name, path in self.settings.models
            ]
        finally:
            self.registry.listing_startup_models = False

    async def start_models(self, entries: list[ModelEntry]) -> list[ModelEntry]:
        await asyncio.gather(*(self.registry.start(e) for e in entries if e.pool is not None))
        return entries

    async def stop(self) -> None:
        """Drain every port at once; at drain_timeout_s end the workers, so what still runs is answered
        (aiohttp would wait its timeout again for a handler awaiting a worker). One period in all."""
        draining = [runner.cleanup() for runner in self._runners]
        if self._grpc is not None:  # (stopping twice is harmless)
            draining.append(self._grpc.stop(self.settings.drain_timeout_s))
        drained = asyncio.ensure_future(asyncio.gather(*draining))
        await asyncio.wait([drained], timeout=self.settings.drain_timeout_s)
        await self.registry.close(1.0 if not drained.done() else self.settings.drain_timeout_s)
        await drained
        self._runners.clear()

    # ---- the whole life, as ``model-archiver serve`` runs it -----------------------------------
    async def serve(
        self,
        ready_file: Path | None = None,
        watched: list[Any] | None = None,
        say: Callable[[str], Any] = print,
    ) -> int:
        """Bind, load the startup models, announce READY (and write ``ready_file``), watch ``watched``
        (--reload) until SIGINT or SIGTERM, then drain and stop. ``say`` prints one line for people."""
        with self.capture_signals() as stop:
            await self.start(load_models=False)
            listed = await self.list_startup_models()
            token = "  (token required)" if self.settings.token else ""
            say(
                f"model-archiver serve: inference {self.url('inference')}  management "
                f"{self.url('management')}  metrics {self.url('metrics')}{self._grpc_line()}{token}"
            )
            say(
                f"model-archiver serve: try a model in the browser at {self.url('inference')}/"
                f" (the API: {self.url('inference')}/docs)"
            )
            loading = asyncio.ensure_future(self.start_models(listed))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([loading, stopped], return_when=asyncio.FIRST_COMPLETED)
            watching: asyncio.Future | None = None
            if loading.done():
                if watched:  # armed before READY: a change right after READY is not missed
                    watching = await self._watch(watched, listed, stop, say)
                self._announce_ready(loading.result(), ready_file, say)
                await stop.wait()
            say("model-archiver serve: stopping; finishing requests in flight")
            loading.cancel()
            stopped.cancel()
            if watching is not None:
                await asyncio.wait([watching], timeout=5)
            await self.stop()
            say("model-archiver serve: stopped")
        return 0

    def _grpc_line(self) -> str:
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        grpc = [(k.replace("_", "-"), p) for k, p in self.ports.items() if k.startswith("grpc")]
        return "".join(f"  {name} {host}:{port}" for name, port in grpc)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[asyncio.Event]:
        """An event SIGINT and SIGTERM set (for ``serve``), the handlers removed on the way out."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            yield stop
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _announce_ready(self, entries: list[ModelEntry], ready_file: Path | None, say: Callable) -> None:
        """Each startup model's state, then ``READY {json}`` (ports, models, worker pids) on stdout."""
        for entry in entries:
            say(f"  {state_line(entry)}")
        ready: dict[str, Any] = {"pid": os.getpid(), **{f"{k}_port": v for k, v in self.ports.items()}}
        ready["models"] = {e.name: e.state.value for e in self.registry.entries()}
        ready["workers"] = {e.name: e.pool.pids() for e in self.registry.entries() if e.pool is not None}
        say("READY " + json.dumps(ready))
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(json.dumps(ready))
            os.replace(tmp, ready_file)
        sys.stdout.flush()

    async def _watch(
        self, watched: list[Any], listed: list[ModelEntry], stop: asyncio.Event, say: Callable
    ) -> asyncio.Future:
        """--reload: serve each watched model's changes until ``stop``, in a task returned once the
        watcher is armed (changes from loading until then are caught up by the reloader itself)."""
        from archiver.serving.supervisor.reload import Reloader

        for model, entry in zip(watched, listed, strict=True):
            model.name = entry.name
        armed = asyncio.Event()
        task = asyncio.ensure_future(Reloader(self.registry, watched).run(stop, armed))
        waiting = asyncio.ensure_future(armed.wait())
        await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        say(f"model-archiver serve: --reload: watching {sum(len(m.paths) for m in watched)} paths")
        return task


def state_line(entry: ModelEntry) -> str:
    """One startup model as ``serve`` prints it: its state, workers and load time, or why it FAILED."""
    s = entry.settings
    head = f"{entry.name} {entry.version}: {entry.state.value}"
    if entry.state is ModelState.FAILED:
        return f"{head}: {entry.reason}"
    load = f", load {entry.load_time_s:.2f} s" if entry.load_time_s is not None else ""
    pids = ", ".join(str(p) for p in entry.pool.pids()) if entry.pool is not None else ""
    return (
        f"{head} (workers {s.workers}: pid {pids or '-'}; batch {s.batch_size}, "
        f"delay {s.max_batch_delay_ms:g} ms{load})"
    )


class ServerThread:
    """A live server on a private event loop in a background thread; ``with`` starts and stops it."""

    def __init__(self, settings: ServerSettings) -> None:
        self.server = Server(settings)
        self._loop = new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="model-archiver-server", daemon=True
        )

    def start(self, load_models: bool = True) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(load_models), self._loop).result()
        return self

    def call(self, coro: Any, timeout_s: float = 120.0) -> Any:
        """Run a coroutine on the server's loop (e.g. ``registry.register``) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop(self) -> None:
        if not self._loop.is_running():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(120)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def url(self, which: str = "inference") -> str:
        return self.server.url(which)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
