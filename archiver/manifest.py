"""The archive's manifest, MAR-INF/MANIFEST.json, in TorchServe's schema and field names.

TorchServe (Java's Gson and the Python backend) ignores keys it does not know, so the sha256 and size of
every file travel in an extra top-level key, ``integrity``, that older readers skip.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from archiver.errors import ManifestError, ModelNameError

MANIFEST_PATH = "MAR-INF/MANIFEST.json"
RUNTIMES = ("python", "python3", "LSP")
# TorchServe's rule (model_packaging_utils.check_model_name_regex_or_exit), ending at \Z: "$" would also
# match before a final newline, and let "name\n" through.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*\Z")
# TorchServe writes local time, day first, no zone; we keep the format so its parser accepts ours.
CREATED_ON_FORMAT = "%d/%m/%Y %H:%M:%S"
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")

# TorchServe's key order for the "model" object (manifest_components/model.py).
_MODEL_KEYS = (
    ("modelName", "model_name"),
    ("serializedFile", "serialized_file"),
    ("handler", "handler"),
    ("modelFile", "model_file"),
    ("modelVersion", "model_version"),
    ("extensions", "extensions"),
    ("requirementsFile", "requirements_file"),
    ("configFile", "config_file"),
)
_TOP_KEYS = ("createdOn", "runtime", "model", "archiverVersion", "integrity")


def check_model_name(name: str) -> str:
    """Apply TorchServe's model-name rule, so an archive we write is one TorchServe will register."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.match(name):
        raise ModelNameError(
            f"invalid model name {name!r}: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return name


def created_on_now() -> str:
    """The createdOn stamp; honours SOURCE_DATE_EPOCH (as UTC) so builds can be reproducible."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return time.strftime(CREATED_ON_FORMAT, time.gmtime(int(epoch)))
        except ValueError as exc:
            raise ManifestError(f"SOURCE_DATE_EPOCH must be an integer, got {epoch!r}") from exc
    return time.strftime(CREATED_ON_FORMAT, time.localtime())


@dataclass(frozen=True)
class FileRecord:
    """What the manifest promises about one file of the archive."""

    sha256: str
    size: int


@dataclass
class Manifest:
    """MAR-INF/MANIFEST.json as a typed object.

    Unknown keys (legacy MMS fields, other tools' additions) are kept in ``extra`` and ``model_extra``
    and written back, so reading and re-writing a manifest loses nothing.
    """

    model_name: str
    handler: str
    model_version: str | None = None
    serialized_file: str | None = None
    model_file: str | None = None
    requirements_file: str | None = None
    config_file: str | None = None
    extensions: str | None = None
    runtime: str = "python"
    created_on: str | None = None
    archiver_version: str | None = None
    files: dict[str, FileRecord] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model_extra: dict[str, Any] = field(default_factory=dict)

    def handler_file(self) -> str | None:
        """The archive path of a custom handler module, or None for a built-in handler."""
        from archiver.handler_spec import handler_file_in_archive

        return handler_file_in_archive(self.handler)

    def to_dict(self) -> dict[str, Any]:
        model: dict[str, Any] = {}
        for json_key, attr in _MODEL_KEYS:
            value = getattr(self, attr)
            if value:
                model[json_key] = value
        model.update(self.model_extra)
        out: dict[str, Any] = {}
        if self.created_on is not None:
            out["createdOn"] = self.created_on
        out["runtime"] = self.runtime
        out["model"] = model
        if self.archiver_version is not None:
            out["archiverVersion"] = self.archiver_version
        out.update(self.extra)
        if self.files is not None:
            out["integrity"] = {
                "algorithm": "sha256",
                "files": {
                    name: {"sha256": rec.sha256, "size": rec.size} for name, rec in sorted(self.files.items())
                },
            }
        return out

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{MANIFEST_PATH} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"{MANIFEST_PATH} must be a JSON object, got {_kind(data)}")
        model = data.get("model")
        if not isinstance(model, dict):
            raise ManifestError(f"{MANIFEST_PATH} has no 'model' object")
        values: dict[str, Any] = {}
        for json_key, attr in _MODEL_KEYS:
            value = model.get(json_key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ManifestError(f"{MANIFEST_PATH}: model.{json_key} must be a string, got {_kind(value)}")
            values[attr] = value
        for required in ("modelName", "handler"):
            if not model.get(required):
                raise ManifestError(f"{MANIFEST_PATH}: model.{required} is missing")
        runtime = data.get("runtime", "python")
        if runtime not in RUNTIMES:
            raise ManifestError(
                f"{MANIFEST_PATH}: runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}"
            )
        for key in ("createdOn", "archiverVersion"):
            if key in data and not isinstance(data[key], str):
                raise ManifestError(f"{MANIFEST_PATH}: {key} must be a string")
        model_keys = {k for k, _ in _MODEL_KEYS}
        return cls(
            **values,
            runtime=runtime,
            created_on=data.get("createdOn"),
            archiver_version=data.get("archiverVersion"),
            files=_parse_integrity(data.get("integrity")),
            extra={k: v for k, v in data.items() if k not in _TOP_KEYS},
            model_extra={k: v for k, v in model.items() if k not in model_keys},
        )


def _parse_integrity(section: Any) -> dict[str, FileRecord] | None:
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("files"), dict):
        raise ManifestError(f"{MANIFEST_PATH}: 'integrity' must be an object with a 'files' object")
    if section.get("algorithm", "sha256") != "sha256":
        raise ManifestError(f"{MANIFEST_PATH}: integrity.algorithm must be 'sha256'")
    records: dict[str, FileRecord] = {}
    for name, rec in section["files"].items():
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("sha256"), str)
            or not _SHA256.match(rec["sha256"])
            or not isinstance(rec.get("size"), int)
            or isinstance(rec.get("size"), bool)
            or rec["size"] < 0
        ):
            raise ManifestError(
                f"{MANIFEST_PATH}: integrity entry for {name!r} needs a hex 'sha256' and a 'size' >= 0"
            )
        records[name] = FileRecord(sha256=rec["sha256"], size=rec["size"])
    return records


def _kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"
