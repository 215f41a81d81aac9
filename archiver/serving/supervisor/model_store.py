"""The model store and the archives in it: which archive a register call's ``url`` names, and what an
archive's head (manifest and model-config.yaml) says, read without unpacking it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from archiver.config import ModelConfig, parse_model_config
from archiver.errors import ModelNotFoundError, UsageError


def archive_in_store(model_store: Path | None, url: str) -> Path:
    """The archive ``url`` names: a plain file name inside ``model_store`` only (UsageError for a path,
    a URL or a name no file system holds; ModelNotFoundError when there is no such file)."""
    if model_store is None:
        raise UsageError("this server has no --model-store, so it cannot register models by name")
    bad = (
        not url
        or "/" in url
        or "\\" in url
        or ".." in url
        or ":" in url
        or url.startswith(".")
        or "\x00" in url
    )
    if bad:
        raise UsageError(
            f"url must be the file name of an archive in the model store (no paths, no URLs), got {url!r}"
        )
    if len(url.encode("utf-8", "surrogatepass")) > 255:  # no file system has longer file names
        raise UsageError(f"url must be a file name of at most 255 bytes, got {len(url)} characters")
    path = model_store / url
    try:
        found = path.exists()
    except (OSError, ValueError):  # never an answer that shows where the store is
        raise UsageError(f"url {url[:80]!r} cannot name a file in the model store") from None
    if not found:
        raise ModelNotFoundError(f"no archive named {url[:80]!r} in the model store")
    if not (path.is_file() or path.is_dir()):  # a FIFO would hang the first read of its head
        raise UsageError(f"{url[:80]!r} in the model store is not a regular file or a folder archive")
    return path


def read_archive_head(source: Path) -> tuple[Any, ModelConfig]:
    """The manifest and model-config of an archive, read without unpacking it."""
    from archiver.reader import open_archive

    with open_archive(source) as reader:
        manifest = reader.manifest
        config = ModelConfig()
        if manifest.config_file:
            config = parse_model_config(reader.read(manifest.config_file), source=manifest.config_file)
    return manifest, config


def archive_stem(path: Path) -> str:
    """An archive's file name without its suffix (what a model that cannot be read is listed as)."""
    name = path.name
    for suffix in (".mar", ".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or name
    return name
