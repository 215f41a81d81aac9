"""Serve archives on Ray Serve: an application builder that Ray's own CLI and config files name.

    serve run archiver.integrations.ray_serve:build_app archives=resnet34.mar,other.mar

One deployment per model; each replica loads its archive with ``load_model`` (the safe reader and the
unpack cache, as a bundled server's worker does) and runs batches formed by ``@serve.batch`` through
``LoadedModel.handle``, the bundled server's own code. Requests are routed by the bundled server's
own router (``protocols/router.py``, through ``routes.dispatch_reply``): the same routes, codecs and answers.
With one archive its deployment is the ingress; with several a small router (no torch, no CPU reserved)
sends each request to its model's deployment. Ray places, restarts and scales the replicas.
A streaming handler streams (``replica_streams.py``): ``/predictions`` answers with Ray's streaming
response, and the router reads its model's answers over a streaming deployment handle.
With ``trusted_keys`` (PEM texts or paths) the builder verifies each archive's signature (``ARCHIVE.sig``
beside it) before reading its settings, and each replica verifies it again before loading it (a replica
may start much later, on another node), refusing to start otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from archiver import settings_bounds
from archiver.errors import UsageError
from archiver.integrations import log_handler_errors, require_extra, signatures
from archiver.integrations.archive_plan import ServePlan, local_path, parse_archive_list, plan_archive
from archiver.integrations.replica_streams import ReplicaSink, Streamed, first_answer
from archiver.integrations.routes import Infer, ModelRoute, ModelTable, dispatch_reply
from archiver.serving.protocols.answer_stream import AnswerStream
from archiver.serving.protocols.records import InferenceResponse, error_response
from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_SIZE
from archiver.serving.protocols.wire import RawRequest, to_inference_request

require_extra("ray", "ray.serve")

from ray import serve  # noqa: E402 - after the one-line message for a missing extra
from ray.serve import Application  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response, StreamingResponse  # noqa: E402

log = logging.getLogger("archiver.integrations.ray_serve")
# How many requests the batch that answered a request had: Ray's metrics do not say, and it is what
# one tunes batchSize and maxBatchDelay by.
BATCH_SIZE_HEADER = "x-archiver-batch-size"


class ArchiveModel:
    """One model's replica: the archive's handler, fed by ``@serve.batch``."""

    def __init__(
        self,
        plan: ServePlan,
        cache_dir: str | None = None,
        max_request_size: int = 0,
        trusted_keys: list[str] | None = None,
    ) -> None:
        from archiver.serving.worker.loader import load_model

        self.plan = plan
        self.max_request_size = max_request_size or DEFAULT_MAX_REQUEST_SIZE
        # before a byte of the archive is unpacked or run; a refusal fails this replica's start
        check = signatures.check_archive(local_path(plan.source), signatures.trusted_keys(trusted_keys))
        self.signer = check.fingerprint if check is not None else None
        if self.signer is not None:
            log.info("%s: signature verified, signed by key %s", plan.name, self.signer)
        self.model = load_model(
            local_path(plan.source),
            name=plan.name,
            cache_dir=cache_dir,
            batch_size=plan.batch_size,
            gpu_id=_ray_gpu_id(plan),
            signed_sha256=signatures.signed_sha256(check),  # the bytes checked above, or none
        )
        log_handler_errors(self.model, log)
        _pin_torch_threads()
        self.sink = ReplicaSink(self.model)  # a streaming handler's answers to their requests
        route = ModelRoute(plan.name, plan.version, self.infer, plan.source, self.infer_first)
        self.table = ModelTable([route])
        self._handle_batch.set_max_batch_size(plan.batch_size)
        self._handle_batch.set_batch_wait_timeout_s(plan.max_batch_delay_ms / 1000.0)

    @serve.batch
    async def _handle_batch(self, items: list[tuple[RawRequest, Streamed]]) -> list[InferenceResponse]:
        # The handler is blocking code: a thread keeps this replica's loop taking the next batch's requests.
        requests = [to_inference_request(raw) for raw, _ in items]
        states = [state for _, state in items]
        answers = await asyncio.to_thread(self.sink.run, states, lambda: self.model.handle(requests))
        for answer in answers:
            answer.headers[BATCH_SIZE_HEADER] = str(len(items))
        return answers

    async def infer(self, request: RawRequest) -> InferenceResponse:
        """One request, answered from the batch it joins (what the router calls): a streaming
        handler's last answer."""
        state = Streamed(streaming=False)
        return state.final(await self._handle_batch((request, state)))

    async def infer_first(self, request: RawRequest) -> InferenceResponse:
        """One request's first answer; a streaming handler's comes with ``rest``, the ones after."""
        state = Streamed(streaming=True)
        return await first_answer(state, asyncio.ensure_future(self._handle_batch((request, state))))

    async def infer_stream(self, request: RawRequest) -> AsyncIterator[Any]:
        """``infer_first`` over a streaming deployment handle (the multi-model router's call): the
        first answer with whether more follow, then each of the others."""
        first = await self.infer_first(request)
        rest, first.rest = first.rest, None
        yield first, rest is not None
        if rest is None:
            return
        try:
            async for answer in rest:
                yield answer
        finally:
            await rest.aclose()

    async def __call__(self, request: Request) -> Response:
        """HTTP, when this model is the application's only one."""
        return await answer_http(request, self.table, self.max_request_size)


def _ray_gpu_id(plan: ServePlan) -> int | None:
    """The GPU Ray gave this replica, as its CUDA sees it: Ray sets CUDA_VISIBLE_DEVICES to the
    ``ray.get_gpu_ids()`` it assigned, so the first is ``cuda:0`` (``placement.replica_gpu_id``)."""
    import ray

    from archiver.serving.supervisor.placement import replica_gpu_id

    return replica_gpu_id(plan.device_type, len(ray.get_gpu_ids()), "this Ray replica (ray.get_gpu_ids())")


def _pin_torch_threads() -> None:
    """One torch thread per CPU the replica holds (at least one), as ``--torch-threads`` does for a
    bundled server's worker: Ray's resources decide, whatever the machine's core count."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return  # a handler without torch
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    torch.set_num_threads(max(1, int(cpus)))


class ArchiveRouter:
    """The ingress of a multi-model application: each request to its model's deployment."""

    def __init__(self, models: list[tuple[ServePlan, Any]], max_request_size: int = 0) -> None:
        self.max_request_size = max_request_size or DEFAULT_MAX_REQUEST_SIZE
        self.table = ModelTable(
            [
                ModelRoute(plan.name, plan.version, _remote_infer(handle), plan.source, _remote_first(handle))
                for plan, handle in models
            ]
        )

    async def __call__(self, request: Request) -> Response:
        return await answer_http(request, self.table, self.max_request_size)


def _remote_infer(handle: Any) -> Infer:
    async def infer(raw: RawRequest) -> InferenceResponse:
        return await handle.infer.remote(raw)

    return infer


_PUMPS: set[asyncio.Task] = set()


def _remote_first(handle: Any) -> Infer:
    """The first answer over the model deployment's ``infer_stream``; a streaming handler's comes with
    ``rest``, fed by the rest of Ray's response stream (closing it cancels that stream)."""

    async def infer_first(raw: RawRequest) -> InferenceResponse:
        answers = handle.options(stream=True).infer_stream.remote(raw)
        first, more = await answers.__anext__()
        if more:
            first.rest = AnswerStream(cancel=answers.cancel)
            pump = asyncio.get_running_loop().create_task(_pump(answers, first.rest))
            _PUMPS.add(pump)  # held until it ends: the loop keeps only weak references to tasks
            pump.add_done_callback(_PUMPS.discard)
        return first

    return infer_first


async def _pump(answers: Any, rest: AnswerStream) -> None:
    try:
        async for answer in answers:
            rest.put(answer)
        rest.end()
    except Exception as exc:  # noqa: BLE001 - the replica died or the stream was cancelled: its last answer
        rest.end(
            error_response(
                503, "ServiceUnavailableError", f"the model's replica failed: {type(exc).__name__}"
            )
        )


def _path(request: Request) -> str:
    path = request.url.path
    root = request.scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.lstrip("/")


async def answer_http(request: Request, table: ModelTable, max_request_size: int) -> Response:
    """One HTTP request from Ray's proxy, answered by ``routes.dispatch_reply``; a streaming handler's
    answers as a streaming response (chunked), each written as it comes."""
    reply = await dispatch_reply(
        table, request.method, _path(request), dict(request.headers), await request.body(), max_request_size
    )
    headers = reply.headers
    headers.pop("x-request-id", None)  # Ray's proxy sends its own (the client's, when it gave one)
    content_type = headers.pop("Content-Type", None)
    if reply.stream is not None:
        chunks = _chunks(reply.body, reply.stream)
        return StreamingResponse(chunks, status_code=reply.status, headers=headers, media_type=content_type)
    return Response(content=reply.body, status_code=reply.status, headers=headers, media_type=content_type)


async def _chunks(first: bytes, rest: AnswerStream) -> AsyncIterator[bytes]:
    """The body of a streamed answer; closed early (the client left), it cancels the request."""
    try:
        yield first
        async for answer in rest:
            yield answer.body
    finally:
        await rest.aclose()


# ---- the application builder ---------------------------------------------------------------------
def _int_arg(args: dict[str, Any], key: str, setting: str | None = None) -> int | None:
    return _checked_arg(args, key, setting or key)


def _float_arg(args: dict[str, Any], key: str, setting: str | None = None) -> float | None:
    return _checked_arg(args, key, setting or key)


def _checked_arg(args: dict[str, Any], key: str, setting: str) -> Any:
    """``args[key]`` in ``setting``'s range (settings_bounds), as text (``serve run ... key=8``) or as
    YAML typed it; UsageError naming ``key`` and the range, as the bundled server's refusals do."""
    value = args.get(key)
    if value in (None, ""):
        return None
    if isinstance(value, str):
        return settings_bounds.parse(setting, value, key)
    return settings_bounds.check(setting, value, key)


def deployment_name(plan: ServePlan, plans: list[ServePlan]) -> str:
    """The model's name, or name_version when several versions of it are served."""
    if sum(1 for p in plans if p.name == plan.name) > 1:
        return f"{plan.name}_{plan.version}".replace(".", "_")
    return plan.name


def plans_from_args(args: dict[str, Any]) -> list[ServePlan]:
    """The archives ``args`` names (``archives``: ``a.mar,b.mar`` or a list), with the overrides
    ``batch_size``, ``max_batch_delay_ms`` and ``num_replicas`` applied to each. With ``trusted_keys``
    each archive's signature is verified before its settings are read from it."""
    known = {
        "archives",
        "batch_size",
        "max_batch_delay_ms",
        "num_replicas",
        "cache_dir",
        "max_request_size",
        "trusted_keys",
    }
    unknown = sorted(set(args) - known)
    if unknown:
        raise UsageError(f"unknown argument {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if "archives" not in args:
        raise UsageError("give the archives to serve: archives=a.mar,b.mar")
    keys = signatures.trusted_keys(args.get("trusted_keys"))
    plans = []
    for source in parse_archive_list(args["archives"]):
        signatures.check_archive(local_path(source), keys)
        plan = plan_archive(
            source,
            batch_size=_int_arg(args, "batch_size"),
            max_batch_delay_ms=_float_arg(args, "max_batch_delay_ms"),
            replicas=_int_arg(args, "num_replicas", "max_workers_per_model"),
        )
        # Replicas may start in another folder (or on another machine with the same mount).
        plans.append(ServePlan(**{**plan.__dict__, "source": str(local_path(source))}))
    seen: set[tuple[str, str]] = set()
    for plan in plans:
        if (plan.name, plan.version) in seen:
            raise UsageError(f"two archives are model {plan.name!r} version {plan.version}")
        seen.add((plan.name, plan.version))
    return plans


def build_app(args: dict[str, Any]) -> Application:
    """The Ray Serve application for the archives ``args`` names (Ray's application-builder protocol)."""
    plans = plans_from_args(args)
    cache_dir = args.get("cache_dir") or None
    max_request_size = _int_arg(args, "max_request_size") or 0  # 0: the server's default
    pems = signatures.pem_texts(signatures.trusted_keys(args.get("trusted_keys"))) or None
    bound = []
    for plan in plans:
        deployment = serve.deployment(ArchiveModel).options(
            name=deployment_name(plan, plans), **plan.deployment_options()
        )
        bound.append((plan, deployment.bind(plan, cache_dir, max_request_size, pems)))
    if len(bound) == 1:
        return bound[0][1]
    router = serve.deployment(ArchiveRouter).options(
        name="router",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(256, sum(p.max_ongoing_requests * p.max_replicas for p in plans)),
    )
    return router.bind(bound, max_request_size)
