"""TorchServe import compatibility: ``from ts.torch_handler.base_handler import BaseHandler`` gets ours.

Handlers written for TorchServe import its classes from the ``ts`` package. The loader wraps a model's
handler import (and initialize) in ``ts_compat_aliases()``: for that window an import hook answers the
``ts.*`` names listed in ``_ALIASES`` with this project's classes; afterwards the hook and every ``ts*``
entry it created leave ``sys.modules``, and whatever was there before comes back.

Ours are used even when TorchServe itself is installed: a handler then runs against the same Context
and BaseHandler as every other model in this server (a real ``ts.context`` would not match what our
loader passes in), and a model cannot change what another one imports. ``ts`` modules we do not
provide fail with a message that lists the ones we do.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
import time
from collections.abc import Callable, Iterator
from functools import wraps
from types import ModuleType
from typing import Any

from archiver.errors import ArchiverError

TORCHSERVE_VERSION = "0.12.0"


class PredictionException(ArchiverError):
    """TorchServe's ``ts.utils.util.PredictionException``: fail the batch with this HTTP status."""

    def __init__(self, message: str, error_code: int = 500) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.http_status = error_code


def list_classes_from_module(module: ModuleType, parent_class: type | None = None) -> list[type]:
    """The classes ``module`` defines itself (not imported ones), optionally only subclasses of one."""
    classes = [
        obj for obj in vars(module).values() if inspect.isclass(obj) and obj.__module__ == module.__name__
    ]
    if parent_class is not None:
        classes = [c for c in classes if issubclass(c, parent_class)]
    return classes


def timed(func: Callable[..., Any]) -> Callable[..., Any]:
    """TorchServe's ``ts.handler_utils.timer.timed``: with ``handler: {profile: true}`` in
    model-config.yaml, record a handler method's time as ``ts_handler_<method>`` in context.metrics."""

    @wraps(func)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        context = getattr(self, "context", None)
        section = (getattr(context, "model_yaml_config", None) or {}).get("handler")
        if not (isinstance(section, dict) and section.get("profile")):
            return func(self, *args, **kwargs)
        started = time.perf_counter()
        try:
            return func(self, *args, **kwargs)
        finally:
            metrics = getattr(context, "metrics", None)
            if metrics is not None:
                metrics.add_time(f"ts_handler_{func.__name__}", (time.perf_counter() - started) * 1000)

    return wrapper


# ts module name -> (our module, names it exports). A name "module:Name" comes from that module instead.
# Packages have an empty tuple and get a __path__. docs/torchserve-surface.md lists every ts module.
_UTIL = "handlers.ts_utils"
_ENVELOPES = "handlers.ts_envelopes"
_ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ts": ("handlers._ts_compat", ()),
    "ts.version": ("handlers._ts_compat", ("__version__",)),
    "ts.context": ("handlers.context", ("Context", "RequestProcessor")),
    "ts.torch_handler": ("handlers", ()),
    "ts.torch_handler.base_handler": ("handlers.base", ("BaseHandler",)),
    "ts.torch_handler.vision_handler": ("handlers.vision", ("VisionHandler",)),
    "ts.torch_handler.image_classifier": ("handlers.image_classifier", ("ImageClassifier",)),
    "ts.torch_handler.densenet_handler": (
        "handlers.ts_densenet",
        ("DenseNetHandler", "list_classes_from_module"),
    ),
    "ts.torch_handler.object_detector": ("handlers.object_detector", ("ObjectDetector",)),
    "ts.torch_handler.image_segmenter": ("handlers.image_segmenter", ("ImageSegmenter",)),
    "ts.torch_handler.text_handler": ("handlers.ts_text", ("TextHandler", "CONTRACTIONS_PATTERN")),
    "ts.torch_handler.contractions": ("handlers.ts_text", ("CONTRACTION_MAP",)),
    "ts.torch_handler.text_classifier": ("handlers.text_classifier", ("TextClassifier",)),
    "ts.torch_handler.request_envelope": (_ENVELOPES, ()),
    "ts.torch_handler.request_envelope.base": (_ENVELOPES, ("BaseEnvelope",)),
    "ts.torch_handler.request_envelope.body": (_ENVELOPES, ("BodyEnvelope",)),
    "ts.torch_handler.request_envelope.json": (_ENVELOPES, ("JSONEnvelope",)),
    "ts.torch_handler.request_envelope.kserve": (_ENVELOPES, ("KServeEnvelope",)),
    "ts.torch_handler.request_envelope.kservev2": (_ENVELOPES, ("KServev2Envelope",)),
    "ts.utils": ("handlers._ts_compat", ()),
    "ts.utils.util": (
        _UTIL,
        (
            "handlers._ts_compat:PredictionException",
            "handlers._ts_compat:list_classes_from_module",
            "handlers.labels:load_label_mapping",
            "handlers.labels:map_class_to_label",
            "CLEANUP_REGEX",
            "PT2Backend",
            "check_valid_pt2_backend",
            "get_yaml_config",
            "deprecated",
        ),
    ),
    "ts.utils.timeit_decorator": (_UTIL, ("timeit",)),
    "ts.handler_utils": ("handlers._ts_compat", ()),
    "ts.handler_utils.timer": ("handlers._ts_compat", ("timed",)),
    "ts.handler_utils.utils": ("handlers.streaming", ("send_intermediate_predict_response",)),
    "ts.protocol": ("handlers._ts_compat", ()),
    "ts.protocol.otf_message_handler": ("handlers.streaming", ("send_intermediate_predict_response",)),
    "ts.handler_utils.micro_batching": ("handlers.ts_micro_batching", ("MicroBatching", "HANDLER_METHODS")),
    "ts.handler_utils.text_utils": (_UTIL, ("get_tokenizer", "ngrams_iterator")),
    "ts.handler_utils.hf_batch_streamer": ("handlers.ts_hf_streamer", ("TextIteratorStreamerBatch",)),
    "ts.metrics": ("handlers._ts_compat", ()),
    "ts.metrics.dimension": ("handlers.metrics", ("Dimension",)),
    "ts.metrics.metric_type_enum": ("handlers.metrics", ("MetricTypes",)),
    "ts.metrics.caching_metric": ("handlers.metrics", ("CachingMetric",)),
    "ts.metrics.metric_cache_errors": (
        "handlers.metrics",
        (
            "GeneralMetricsCacheError",
            "MetricsCacheKeyError",
            "MetricsCacheTypeError",
            "MetricsCacheValueError",
        ),
    ),
}
_PACKAGES = {
    "ts",
    "ts.torch_handler",
    "ts.torch_handler.request_envelope",
    "ts.utils",
    "ts.handler_utils",
    "ts.protocol",
    "ts.metrics",
}


class _TsAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of ``ts`` and the listed ``ts.*`` modules with alias modules of ours."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "ts" and not fullname.startswith("ts."):
            return None
        if fullname not in _ALIASES:
            from handlers.ts_refused import refusal

            why = refusal(fullname)
            if why is None:
                provided = ", ".join(n for n in _ALIASES if n not in _PACKAGES)
                why = (
                    f"No module named {fullname!r}: model-archiver runs TorchServe handlers with its own "
                    f"classes and provides only {provided}"
                )
            raise ModuleNotFoundError(why, name=fullname)
        self.imported.add(fullname)
        spec = importlib.util.spec_from_loader(fullname, self, is_package=fullname in _PACKAGES)
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def __init__(self) -> None:
        self.imported: set[str] = set()  # the ts modules a handler imported (it was written for TorchServe)

    def exec_module(self, module: ModuleType) -> None:
        source, names = _ALIASES[module.__name__]
        module.__version__ = TORCHSERVE_VERSION
        for name in names:
            where, _, attribute = name.rpartition(":")
            try:
                ours = importlib.import_module(where or source)
            except ImportError as exc:  # e.g. transformers for the streamer: say which ts module needs it
                raise ModuleNotFoundError(
                    f"{module.__name__} needs {exc.name or 'a module'} installed ({exc})", name=exc.name
                ) from exc
            if hasattr(ours, attribute):  # a name ours lacks fails `from ... import` by its name
                setattr(module, attribute, getattr(ours, attribute))


def _is_ts(name: str) -> bool:
    return name == "ts" or name.startswith("ts.")


@contextlib.contextmanager
def ts_compat_aliases() -> Iterator[set[str]]:
    """For the block only, ``import ts.…`` resolves to this project's handler classes; the block gets
    the set of ``ts`` modules imported in it (non-empty: the handler was written for TorchServe)."""
    saved = {name: sys.modules.pop(name) for name in [n for n in sys.modules if _is_ts(n)]}
    finder = _TsAliasFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield finder.imported
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if _is_ts(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
