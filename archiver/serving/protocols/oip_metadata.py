"""A model's Open Inference Protocol metadata: its inputs and outputs, read without torch.

Where the names, datatypes and shapes come from, first found wins:

1. ``signature:`` in the archive's model-config.yaml (``inputs`` / ``outputs``: lists of
   ``{name, datatype, shape}``, -1 for a variable dimension), which TorchServe ignores;
2. a ``torch.export`` program (``.pt2``): its graph's user inputs and outputs, read from the JSON
   inside the zip (a symbolic dimension is -1);
3. nothing: empty lists (a TorchScript file does not record its input shapes).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from archiver.config import parse_model_config
from archiver.errors import ArchiverError
from archiver.serving.protocols.oip import DATATYPES

# torch.export's serialized ScalarType codes (torch/_export/serde/schema.py) -> v2 datatypes.
_SCALAR_TYPES = {
    1: "UINT8",
    2: "INT8",
    3: "INT16",
    4: "INT32",
    5: "INT64",
    6: "FP16",
    7: "FP32",
    8: "FP64",
    12: "BOOL",
    13: "BF16",
    28: "UINT16",
    34: "UINT32",
    35: "UINT64",
}
_MAX_PROGRAM_JSON = 64 * 1024 * 1024
# A .pt2 inside a .mar or .tar.gz is read into memory to find its graph; past this size it is not.
_MAX_PT2_READ = 256 * 1024 * 1024


def _tensor_specs(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ArchiverError(f"{where} must be a list of {{name, datatype, shape}}")
    specs = []
    for item in value:
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and item.get("datatype") in DATATYPES
            and isinstance(item.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in item["shape"])
        )
        if not ok:
            raise ArchiverError(f"{where}: each entry needs a name, a known datatype and a shape of ints")
        specs.append({"name": item["name"], "datatype": item["datatype"], "shape": list(item["shape"])})
    return specs


def signature_from_config(raw: dict[str, Any]) -> tuple[list[dict], list[dict]] | None:
    """(inputs, outputs) declared under ``signature:`` in model-config.yaml, or None when absent."""
    signature = raw.get("signature")
    if signature is None:
        return None
    if not isinstance(signature, dict):
        raise ArchiverError("signature in model-config.yaml must be a mapping with inputs and outputs")
    return (
        _tensor_specs(signature.get("inputs"), "signature.inputs"),
        _tensor_specs(signature.get("outputs"), "signature.outputs"),
    )


def _dims(sizes: list[Any]) -> list[int]:
    return [s.get("as_int", -1) for s in sizes]


def signature_from_export(archive: zipfile.ZipFile) -> tuple[list[dict], list[dict]] | None:
    """(inputs, outputs) of a torch.export program's graph, or None when it is not one."""
    names = [n for n in archive.namelist() if n.endswith("models/model.json")]
    if len(names) != 1 or archive.getinfo(names[0]).file_size > _MAX_PROGRAM_JSON:
        return None
    program = json.loads(archive.read(names[0]))
    graph = program["graph_module"]["graph"]
    values = graph["tensor_values"]
    signature = program["graph_module"]["signature"]

    def spec(name: str) -> dict[str, Any] | None:
        meta = values.get(name)
        if meta is None or meta.get("dtype") not in _SCALAR_TYPES:
            return None
        return {"name": name, "datatype": _SCALAR_TYPES[meta["dtype"]], "shape": _dims(meta["sizes"])}

    inputs = [
        spec(s["user_input"]["arg"]["as_tensor"]["name"])
        for s in signature["input_specs"]
        if "as_tensor" in s.get("user_input", {}).get("arg", {})
    ]
    outputs = [
        spec(s["user_output"]["arg"]["as_tensor"]["name"])
        for s in signature["output_specs"]
        if "as_tensor" in s.get("user_output", {}).get("arg", {})
    ]
    if any(s is None for s in inputs + outputs):
        return None
    # Handlers name outputs output-0, output-1, ... unless model-config.yaml declares them.
    renamed = [{**s, "name": f"output-{i}"} for i, s in enumerate(outputs)]  # type: ignore[dict-item]
    return inputs, renamed  # type: ignore[return-value]


def read_signature(source: Path, manifest: dict[str, Any] | None) -> tuple[list[dict], list[dict]]:
    """A model's (inputs, outputs) for its v2 metadata; blocking (run it in an executor)."""
    from archiver.reader import open_archive

    model = (manifest or {}).get("model", {})
    with open_archive(source) as reader:
        if model.get("configFile"):
            config = parse_model_config(reader.read(model["configFile"]), source=model["configFile"])
            declared = signature_from_config(config.raw)
            if declared is not None:
                return declared
        serialized = model.get("serializedFile") or ""
        if serialized.endswith(".pt2"):
            found = _pt2_signature(reader, source, serialized)
            if found is not None:
                return found
    return [], []


def _pt2_signature(reader: Any, source: Path, serialized: str) -> tuple[list[dict], list[dict]] | None:
    """The program's signature, read from the file in place in a folder archive, else from the
    archive into memory, but only up to _MAX_PT2_READ bytes (the front keeps no model in memory)."""
    try:
        size = reader.size(serialized)  # also: it is a member of the archive, not any path
        if source.is_dir():
            opened = zipfile.ZipFile(source / serialized)
        elif size <= _MAX_PT2_READ:
            opened = zipfile.ZipFile(io.BytesIO(reader.read(serialized)))
        else:
            return None
        with opened as program:
            return signature_from_export(program)
    except (ArchiverError, OSError, zipfile.BadZipFile, KeyError, TypeError, ValueError, AttributeError):
        return None


def platform_of(manifest: dict[str, Any] | None) -> str:
    """The v2 ``platform`` string: what kind of serialized model the archive holds."""
    serialized = ((manifest or {}).get("model") or {}).get("serializedFile") or ""
    if serialized.endswith(".pt2"):
        return "pytorch_pt2"
    if serialized.endswith((".pt", ".pth", ".torchscript")):
        return "pytorch_torchscript" if serialized.endswith((".pt", ".torchscript")) else "pytorch"
    return "python"
