"""Thin hosts for archives on existing engines: Ray Serve (``ray_serve``) and KServe (``kserve``).

They hold no request logic of their own: archives load through ``archiver.serving.worker.loader`` and requests
cross HTTP through the bundled server's codecs. Each engine is an optional extra; a missing one is a
one-line error naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from archiver.errors import MissingExtraError

# extra -> the module that proves it is installed
EXTRAS = {"ray": "ray.serve", "kserve": "kserve"}


def require_extra(extra: str, module: str | None = None) -> None:
    """Raise DependencyError (one line, naming the extra) when ``extra``'s packages are not installed."""
    target = module or EXTRAS[extra]
    try:
        found = importlib.util.find_spec(target) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtraError(
            f"this needs the optional '{extra}' extra, which is not installed: "
            f"pip install 'torchmar[{extra}]'"
        )


def log_handler_errors(model: Any, log: logging.Logger) -> None:
    """Log each batch the handler fails with the frames in the archive's own files, as a bundled
    server's worker does (each request of that batch is already answered with a 500)."""
    from archiver.serving.worker.tracebacks import error_block, user_trace

    def report(exc: BaseException) -> None:
        log.error(
            "%s", error_block(f'handler error in model "{model.name}"', user_trace(exc, model.model_dir))
        )

    model.on_handler_error = report
