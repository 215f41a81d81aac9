"""Tell the two kinds of ``.pt2`` file apart by their zip entries, without importing torch.

A ``.pt2`` is a zip that torch writes in two kinds: a ``torch.export`` program (``torch.export.save``:
a graph in ``models/*.json`` plus weights, run by torch's Python interpreter of the graph) and an
AOTInductor package (``aoti_compile_and_package``: C++ compiled into ``data/aotinductor/<model>/*.so``,
with its metadata beside it in ``*wrapper_metadata.json``, whose ``AOTI_DEVICE_KEY`` names the device
the code was compiled for). Both carry ``archive_format`` = ``pt2`` under one top folder; a program
says where its weights live in ``data/weights/model_weights_config.json`` (each tensor's ``device``).
The name proves nothing (TorchServe archives name any serialized file ``model.pt``), so the loader,
``inspect`` and the export check all ask this module.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import IO

from archiver.errors import ArchiveFormatError

AOTI = "aoti"
EXPORT = "export"
KIND_NAMES = {AOTI: "AOTInductor package", EXPORT: "torch.export program"}
# The metadata key export_model(method="aoti") writes into the package: the largest batch it was
# exported and checked for. torch itself records no bound, so packages compiled elsewhere have none.
MAX_BATCH_KEY = "model_archiver.max_batch"
_METADATA_LIMIT_BYTES = 1 << 20
_WEIGHTS_CONFIG_LIMIT_BYTES = 64 << 20  # about 600 bytes a tensor: 100,000 tensors


@dataclass
class Pt2Info:
    """What a ``.pt2`` holds: its kind, and for an AOTInductor package its compile-time metadata."""

    kind: str
    metadata: dict[str, str] = field(default_factory=dict)
    weights_device: str | None = None  # a program's: 'cuda' when any weight was saved on a GPU

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind]

    @property
    def max_batch(self) -> int | None:
        """The largest batch the package was exported for, when our exporter recorded it."""
        value = self.metadata.get(MAX_BATCH_KEY, "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    @property
    def device(self) -> str | None:
        """The device a package's code was compiled for, or a program's weights were saved on ('cpu',
        'cuda'); None when the file does not say."""
        if self.kind == EXPORT:
            return self.weights_device
        return self.metadata.get("AOTI_DEVICE_KEY") or None

    def describe(self) -> str:
        """One line for a user: the kind and, for a package, what it was compiled for."""
        if self.kind != AOTI:
            on = self.weights_device
            return self.kind_name + (f", exported on {on}" if on and on != "cpu" else "")
        parts = []
        if self.device:
            isa = self.metadata.get("AOTI_CPU_ISA") if self.device == "cpu" else None
            parts.append(f"compiled for {self.device}" + (f" ({isa})" if isa else ""))
        machine = " ".join(
            v for v in (self.metadata.get("AOTI_PLATFORM"), self.metadata.get("AOTI_MACHINE")) if v
        )
        if machine:
            parts.append(machine)
        parts.append(f"batch 1 to {self.max_batch}" if self.max_batch else "batch bound not recorded")
        return f"{self.kind_name}, {', '.join(parts)}"


def read_pt2_info(source: str | os.PathLike | IO[bytes]) -> Pt2Info | None:
    """The kind of ``.pt2`` at ``source`` (a path or a seekable binary file); None when it is not one.

    Not a zip, a TorchScript zip, a state dict: all None (the caller decides what those are). A zip
    that says ``pt2`` but holds neither a graph nor compiled code raises ArchiveFormatError.
    """
    try:
        with zipfile.ZipFile(source) as zf:
            return _classify(zf)
    except (zipfile.BadZipFile, EOFError):
        return None
    except OSError as exc:
        raise ArchiveFormatError(f"cannot read {_label(source)}: {exc}") from exc


def _classify(zf: zipfile.ZipFile) -> Pt2Info | None:
    names = zf.namelist()
    markers = [n for n in names if n.count("/") == 1 and n.endswith("/archive_format")]
    # Sizes are checked before reading: the inner zip may come from an archive nobody vouches for.
    if not markers or zf.getinfo(markers[0]).file_size > 64 or zf.read(markers[0]).strip() != b"pt2":
        return None
    top = markers[0].split("/", 1)[0]
    compiled = [n for n in names if n.startswith(f"{top}/data/aotinductor/")]
    if compiled:
        return Pt2Info(AOTI, _metadata(zf, compiled))
    if any(n.startswith(f"{top}/models/") and n.endswith(".json") for n in names):
        return Pt2Info(
            EXPORT, weights_device=_weights_device(zf, f"{top}/data/weights/model_weights_config.json")
        )
    raise ArchiveFormatError(
        "this .pt2 holds neither a torch.export program (models/*.json) nor an AOTInductor package "
        "(data/aotinductor/)"
    )


def _metadata(zf: zipfile.ZipFile, compiled: list[str]) -> dict[str, str]:
    for name in sorted(compiled):
        if name.endswith("wrapper_metadata.json") and zf.getinfo(name).file_size <= _METADATA_LIMIT_BYTES:
            try:
                data = json.loads(zf.read(name))
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    return {}


def _weights_device(zf: zipfile.ZipFile, name: str) -> str | None:
    """'cuda' (or another accelerator) when a weight of the program was saved there, 'cpu' when all
    were, None when the file is missing or unreadable."""
    try:
        if zf.getinfo(name).file_size > _WEIGHTS_CONFIG_LIMIT_BYTES:
            return None
        config = json.loads(zf.read(name)).get("config", {})
    except (KeyError, ValueError, AttributeError):
        return None
    kinds = set()
    for entry in config.values() if isinstance(config, dict) else ():
        device = entry.get("tensor_meta", {}).get("device", {}) if isinstance(entry, dict) else {}
        if isinstance(device, dict) and isinstance(device.get("type"), str):
            kinds.add(device["type"])
    others = sorted(kinds - {"cpu"})
    return others[0] if others else ("cpu" if kinds else None)


def _label(source: str | os.PathLike | IO[bytes]) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the file"
