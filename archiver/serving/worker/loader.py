"""Load an archive into a ready handler: open it safely, unpack once, import in isolation, initialize.

``load_model`` is what ``model-archiver predict`` and every server worker call; ``LoadedModel.handle``
runs one batch and never raises for the handler's trouble: each request gets exactly one response,
an error for a request the handler rejected, an error for all of them when the handler itself failed.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archiver import __version__
from archiver.config import ModelConfig, parse_model_config
from archiver.errors import (
    ArchiverError,
    ConfigError,
    HandlerError,
    HandlerInputError,
    IntegrityError,
    reason,
)
from archiver.handler_spec import BUILTIN_HANDLERS, parse_handler
from archiver.manifest import Manifest
from archiver.reader import open_archive
from archiver.serving.protocols.media_types import mime_type
from archiver.serving.protocols.oip import PROTOCOL_HEADER, V2_BODY
from archiver.serving.protocols.records import (
    InferenceRequest,
    InferenceResponse,
    make_request,
)
from archiver.serving.worker.handler_answers import (
    DETAILED_ERRORS,
    answer_response,
    batch_failure_response,
    failure_response,
    handler_errors_style,
    miscounted_response,
    output_names,
    tensor_rows,
)
from archiver.serving.worker.isolation import import_spec_exists, isolated_imports
from archiver.serving.worker.tracebacks import user_trace
from archiver.unpack_cache import unpack_cached
from handlers.metrics import add_prediction_time
from handlers.streaming import drive, stream_indexes

EntryPoint = Callable[[Any, Any], Any]


def load_model(
    source: str | Path,
    *,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    gpu_id: int | None = None,
    batch_size: int = 1,
    limit_max_image_pixels: bool = True,
    signed_sha256: str | None = None,
) -> LoadedModel:
    """Open ``source`` (.mar, .tar.gz or folder), unpack it into the cache and initialize its handler.

    ``signed_sha256`` is the sha256 a signature check verified (``SignatureCheck.sha256``): an archive
    whose bytes are not those by now is refused before a byte of it is unpacked or run.

    Each call returns an independent handler instance (its own copy of the handler's modules), so a
    server calls it once per worker. Raises ArchiverError subclasses with the reason.
    """
    started = time.perf_counter()
    manifest, model_dir = _unpack(source, cache_dir, signed_sha256)
    config = _read_config(model_dir, manifest)
    context = _handler_context(
        name or manifest.model_name, manifest, model_dir, config, gpu_id, batch_size, limit_max_image_pixels
    )
    entry_point, handler, imports_ts = _start_handler(manifest, model_dir, context)
    return LoadedModel(
        name=context.model_name,
        version=manifest.model_version or "1.0",
        manifest=manifest,
        model_dir=model_dir,
        config=config,
        context=context,
        entry_point=entry_point,
        handler=handler,
        load_time_s=time.perf_counter() - started,
        errors_style=handler_errors_style(config.raw, imports_ts),
    )


def _unpack(
    source: str | Path, cache_dir: str | Path | None, signed_sha256: str | None
) -> tuple[Manifest, Path]:
    """The archive's manifest and the cache folder it is unpacked in; a C++ (LSP) archive is refused."""
    with open_archive(source) as reader:
        manifest = reader.manifest
        if manifest.runtime == "LSP":
            raise HandlerError(
                f"{manifest.model_name} is a C++ (runtime LSP) archive; only Python handlers are served here"
            )
        model_dir, _ = unpack_cached(reader, cache_dir, signed_sha256=signed_sha256)
    return manifest, model_dir


def _handler_context(
    name: str,
    manifest: Manifest,
    model_dir: Path,
    config: ModelConfig,
    gpu_id: int | None,
    batch_size: int,
    limit_max_image_pixels: bool,
) -> Any:
    """The ``Context`` a handler's ``initialize`` gets (TorchServe's), with PIL's pixel limit set to match."""
    from handlers.context import Context

    context = Context(
        model_name=name,
        model_dir=str(model_dir),
        manifest=manifest.to_dict(),
        batch_size=max(1, int(batch_size)),
        gpu=gpu_id,
        mms_version=__version__,
        limit_max_image_pixels=limit_max_image_pixels,
        model_yaml_config=config.raw,
    )
    if not limit_max_image_pixels:
        from PIL import Image

        # TorchServe's meaning of limit_max_image_pixels=false; PIL keeps this limit process-wide.
        Image.MAX_IMAGE_PIXELS = None
    return context


def _start_handler(manifest: Manifest, model_dir: Path, context: Any) -> tuple[EntryPoint, Any, bool]:
    """The handler's entry point and instance, initialized in the archive's own imports, and whether it
    imported ``ts`` (written for TorchServe); a failure keeps the frames in the archive's files and,
    when an import failed and the archive lists requirements, says how to install them."""
    from handlers._ts_compat import ts_compat_aliases

    try:
        with isolated_imports(model_dir), ts_compat_aliases() as ts_modules:
            entry_point, handler = _resolve_entry_point(manifest.handler, model_dir, context)
            return entry_point, handler, bool(ts_modules)
    except HandlerError as exc:
        exc.trace = user_trace(exc, model_dir)  # the frames in the archive's files, for the caller to show
        if manifest.requirements_file and _caused_by(exc, ImportError):
            hint = (
                "serve with --install-model-deps to install them, or "
                f"pip install -r {model_dir / manifest.requirements_file}"
            )
            error = HandlerError(f"{exc.message} (the archive lists its requirements: {hint})")
            error.trace = exc.trace
            raise error from exc
        raise


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__
    return False


def _read_config(model_dir: Path, manifest: Manifest) -> ModelConfig:
    if not manifest.config_file:
        return ModelConfig()
    path = model_dir / manifest.config_file
    if not path.is_file():
        raise IntegrityError(f"the manifest names {manifest.config_file!r}, which is not in the archive")
    try:
        return parse_model_config(path.read_bytes(), source=manifest.config_file)
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read {manifest.config_file}: {exc.strerror}") from exc


def _resolve_entry_point(handler: str, model_dir: Path, context: Any) -> tuple[EntryPoint, Any]:
    """Import the handler module and return (entry point, handler instance or None), initialized.

    TorchServe's rules: ``module[:function]``; a module-level ``handle`` (or the named function) is a
    function entry point, called once with ``data=None`` now; otherwise the module must define one
    handler class, which is instantiated and initialized.
    """
    spec = parse_handler(handler)
    module = _import_handler_module(spec.module, model_dir, handler)
    function_name = spec.function or "handle"
    function = getattr(module, function_name, None)
    if function is not None:
        if not callable(function):
            raise HandlerError(f"handler {handler!r}: {function_name} is not a function")
        _run_init(lambda: function(None, context), handler)
        return function, None
    if spec.function:
        raise HandlerError(f"handler {handler!r}: the module has no function {spec.function!r}")
    handler_class = _single_handler_class(module, handler)
    try:
        instance = handler_class()
    except (Exception, SystemExit) as exc:
        raise HandlerError(f"handler {handler!r}: {handler_class.__name__}() failed: {reason(exc)}") from exc
    entry = getattr(instance, "handle", None)
    if not callable(entry):
        raise HandlerError(f"handler {handler!r}: class {handler_class.__name__} has no handle method")
    initialize = getattr(instance, "initialize", None)
    if callable(initialize):
        _run_init(lambda: initialize(context), handler)
    return entry, instance


def _import_handler_module(module_name: str, model_dir: Path, handler: str) -> Any:
    if import_spec_exists(model_dir, module_name):
        target = module_name
    elif module_name in BUILTIN_HANDLERS:
        target = f"handlers.{module_name}"
    else:
        raise HandlerError(
            f"handler {handler!r}: {module_name}.py is not in the archive and {module_name!r} is not a "
            f"built-in handler ({', '.join(BUILTIN_HANDLERS)})"
        )
    try:
        module = importlib.import_module(target)
    except (Exception, SystemExit) as exc:
        raise HandlerError(f"handler {handler!r} failed to import: {reason(exc)}") from exc
    origin = Path(getattr(module, "__file__", None) or "/").resolve()
    if target == module_name and model_dir.resolve() not in origin.parents:
        raise HandlerError(
            f"handler {handler!r}: {module_name}.py has the name of an installed module ({origin}); rename it"
        )
    return module


def _single_handler_class(module: Any, handler: str) -> type:
    classes = [
        obj for obj in vars(module).values() if inspect.isclass(obj) and obj.__module__ == module.__name__
    ]
    if len(classes) > 1:
        # TorchServe refuses any second class; a helper class beside the handler is harmless.
        classes = [c for c in classes if callable(getattr(c, "handle", None))]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise HandlerError(
            f"handler {handler!r} has no handle function and must define exactly one handler class "
            f"(found: {found})"
        )
    return classes[0]


def _run_init(call: Callable[[], Any], handler: str) -> None:
    try:
        call()
    except ArchiverError as exc:
        raise HandlerError(f"handler {handler!r} failed to initialize: {exc.message}") from exc
    except (Exception, SystemExit) as exc:
        raise HandlerError(f"handler {handler!r} failed to initialize: {reason(exc)}") from exc


class LoadedModel:
    """An initialized handler for one archive, answering batches of InferenceRequest."""

    def __init__(
        self,
        *,
        name: str,
        version: str,
        manifest: Manifest,
        model_dir: Path,
        config: ModelConfig,
        context: Any,
        entry_point: EntryPoint,
        handler: Any,
        load_time_s: float,
        errors_style: str = DETAILED_ERRORS,
    ) -> None:
        self.name = name
        self.version = version
        self.manifest = manifest
        self.model_dir = model_dir
        self.config = config
        self.context = context
        self.handler = handler
        self.load_time_s = load_time_s
        # How a batch the handler failed is answered (handler_answers.batch_failure_response).
        self.errors_style = errors_style
        self._entry_point: EntryPoint | None = entry_point
        # Called with the exception when the handler fails a whole batch (the worker logs its frames).
        self.on_handler_error: Callable[[BaseException], None] | None = None
        # The Context carries one batch's per-request state: batches through one instance take turns.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LoadedModel(name={self.name!r}, version={self.version!r}, model_dir='{self.model_dir}')"

    def handle(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        """Run one batch through the handler; exactly one response per request, in order."""
        if any(r.headers.get(PROTOCOL_HEADER) == V2_BODY for r in requests):
            from archiver.serving.worker.oip_worker import answer_v2_bodies  # v2 requests sent whole

            return answer_v2_bodies(requests, self._handle_kept, self.name, self.version)
        return self._handle(requests)

    def _handle_kept(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        """``_handle`` for requests whose v2 answer is built in this process: tensor answers stay
        output tensors (``oip.OutputsResponse``) rather than a body to be parsed back."""
        return self._handle(requests, keep_tensors=True)

    def _handle(
        self, requests: list[InferenceRequest], keep_tensors: bool = False
    ) -> list[InferenceResponse]:
        count = len(requests)
        if count == 0:
            return []
        with self._lock:
            entry_point = self._entry_point
            if entry_point is None:
                raise HandlerError(f"model {self.name!r} is closed")
            context = self.context
            context.begin_batch([r.request_id for r in requests], [dict(r.headers) for r in requests])
            data = [dict(r.params) for r in requests]
            rows = tensor_rows(requests, data)  # Open Inference Protocol requests: rows of tensors
            started = time.perf_counter()
            try:
                answers = entry_point(data, context)
            except SystemExit as exc:
                # In a worker this would end the process for nothing: the batch fails, the worker stays.
                error = HandlerError(f"handler called sys.exit({exc.code!r}) while handling a batch")
                self._handler_failed(exc)
                return [failure_response(error, self.model_dir) for _ in requests]
            except Exception as exc:  # noqa: BLE001 - the handler's failure is each request's 500 (503)
                self._handler_failed(exc)
                return [batch_failure_response(exc, self.model_dir, self.errors_style) for _ in requests]
            if not isinstance(answers, list) or len(answers) != count:
                return [miscounted_response(answers, count, self.errors_style) for _ in requests]
            add_prediction_time(context, started)
            context.end_batch(answers)  # TorchServe's stopping_criteria, once per answer
            streams = stream_indexes(answers)
            if streams:  # generators: each item sent as it comes (handlers/streaming.py)
                drive(answers, streams, context)
            model_dir = self.model_dir
            if not rows:
                return [answer_response(context, i, answer, model_dir) for i, answer in enumerate(answers)]
            names = output_names(context)  # once a batch, not once a request
            return [
                answer_response(context, i, answer, model_dir, i in rows, names, keep_tensors)
                for i, answer in enumerate(answers)
            ]

    def _handler_failed(self, exc: BaseException) -> None:
        report = self.on_handler_error
        if report is not None:
            with contextlib.suppress(Exception):  # reporting must not change the batch's answers
                report(exc)

    def predict(self, payloads: list[Any]) -> list[Any]:
        """Answer payloads in-process (bytes: raw body, str: text, dict/list: JSON); errors at their index."""
        requests = [make_request(uuid.uuid4().hex, *_encode_payload(p)) for p in payloads]
        return [_decode_response(r) for r in self.handle(requests)]

    def close(self) -> None:
        """Drop the handler and its model so their memory can be freed."""
        self._entry_point = None
        self.handler = None


def _encode_payload(payload: Any) -> tuple[bytes, str]:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload), "application/octet-stream"
    if isinstance(payload, str):
        return payload.encode("utf-8"), "text/plain; charset=utf-8"
    if isinstance(payload, Path):
        return payload.read_bytes(), "application/octet-stream"
    return json.dumps(payload).encode("utf-8"), "application/json"


def _decode_response(response: InferenceResponse) -> Any:
    if not response.ok:
        cls = HandlerInputError if response.status == 400 else ArchiverError
        return cls(response.message or f"request failed with {response.status}", http_status=response.status)
    mime = mime_type(response.content_type)
    if mime == "application/json":
        return json.loads(response.body)
    if mime.startswith("text/"):
        return response.body.decode("utf-8", errors="replace")
    return response.body
