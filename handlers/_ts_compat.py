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
    """TorchServe's ``ts.handler_utils.timer.timed``: record a handler method's time in context.metrics."""

    @wraps(func)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return func(self, *args, **kwargs)
        finally:
            metrics = getattr(getattr(self, "context", None), "metrics", None)
            if metrics is not None:
                metrics.add_time(f"ts_handler_{func.__name__}", (time.perf_counter() - started) * 1000)

    return wrapper


# ts module name -> (our module, names it exports). Packages have an empty tuple and get a __path__.
_ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ts": ("handlers._ts_compat", ()),
    "ts.context": ("handlers.context", ("Context", "RequestProcessor")),
    "ts.torch_handler": ("handlers", ()),
    "ts.torch_handler.base_handler": ("handlers.base", ("BaseHandler",)),
    "ts.torch_handler.vision_handler": ("handlers.vision", ("VisionHandler",)),
    "ts.torch_handler.image_classifier": ("handlers.image_classifier", ("ImageClassifier",)),
    "ts.torch_handler.object_detector": ("handlers.object_detector", ("ObjectDetector",)),
    "ts.torch_handler.image_segmenter": ("handlers.image_segmenter", ("ImageSegmenter",)),
    "ts.torch_handler.text_classifier": ("handlers.text_classifier", ("TextClassifier",)),
    "ts.utils": ("handlers._ts_compat", ()),
    "ts.utils.util": (
        "handlers._ts_compat",
        ("PredictionException", "list_classes_from_module", "load_label_mapping", "map_class_to_label"),
    ),
    "ts.handler_utils": ("handlers._ts_compat", ()),
    "ts.handler_utils.timer": ("handlers._ts_compat", ("timed",)),
    "ts.metrics": ("handlers._ts_compat", ()),
    "ts.metrics.dimension": ("handlers.context", ("Dimension",)),
    "ts.metrics.metric_type_enum": ("handlers.context", ("MetricTypes",)),
}
_PACKAGES = {"ts", "ts.torch_handler", "ts.utils", "ts.handler_utils", "ts.metrics"}


class _TsAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of ``ts`` and the listed ``ts.*`` modules with alias modules of ours."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "ts" and not fullname.startswith("ts."):
            return None
        if fullname not in _ALIASES:
            provided = ", ".join(n for n in _ALIASES if n not in _PACKAGES)
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: model-archiver runs TorchServe handlers with its own "
                f"classes and provides only {provided}",
                name=fullname,
            )
        spec = importlib.util.spec_from_loader(fullname, self, is_package=fullname in _PACKAGES)
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        source, names = _ALIASES[module.__name__]
        if not names:
            module.__version__ = TORCHSERVE_VERSION
            return
        ours = importlib.import_module(source)
        for name in names:
            value = getattr(ours, name, None)
            if value is None and name in ("load_label_mapping", "map_class_to_label"):
                value = getattr(importlib.import_module("handlers.labels"), name)
            setattr(module, name, value)


def _is_ts(name: str) -> bool:
    return name == "ts" or name.startswith("ts.")


@contextlib.contextmanager
def ts_compat_aliases() -> Iterator[None]:
    """For the block only, ``import ts.…`` resolves to this project's handler classes."""
    saved = {name: sys.modules.pop(name) for name in [n for n in sys.modules if _is_ts(n)]}
    finder = _TsAliasFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if _is_ts(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
