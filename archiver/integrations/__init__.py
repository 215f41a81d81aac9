"""Thin hosts for archives on existing engines: Ray Serve (``ray_serve``) and KServe (``kserve``).

They hold no request logic of their own: archives load through ``archiver.serving.loader`` and requests
cross HTTP through the bundled server's codecs. Each engine is an optional extra; a missing one is a
one-line error naming the extra to install.
"""

from __future__ import annotations

import importlib.util

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
