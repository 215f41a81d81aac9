"""Loading archives and answering predictions: in-process (``load_model``) and over HTTP."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("load_model", "LoadedModel"):
        from archiver.serving.worker import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'archiver.serving' has no attribute {name!r}")
