"""index_to_name.json: read it as the file has it, and turn a class index into a label.

TorchServe 0.12 rewrites ``{"0": ["n01440764", "tench"]}`` to ``{"0": "tench"}`` when it loads the file, so
a handler that indexes ``self.mapping[str(i)][1]`` answers one character of the name. Here ``self.mapping``
is the file's content, untouched, and the default handlers read labels through ``label_for``, which accepts
both the plain and the list form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from archiver.errors import HandlerError

LABEL_FILE = "index_to_name.json"


def load_label_mapping(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` exactly as written, or None when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise HandlerError(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(mapping, dict):
        raise HandlerError(
            f"{path.name} must be a JSON object of index -> label, got {type(mapping).__name__}"
        )
    return mapping


def label_for(mapping: dict[str, Any] | None, index: int) -> str:
    """The human label of class ``index``; the index itself (as a string) when the mapping lacks it.

    Accepts ``{"0": "tench"}``, ``{"0": ["n01440764", "tench"]}`` (the last string is the name) and
    TorchServe's ``{"object_type_names": ["tench", ...]}``.
    """
    if not mapping:
        return str(index)
    names = mapping.get("object_type_names")
    if isinstance(names, list):
        return _as_label(names[index], index) if 0 <= index < len(names) else str(index)
    return _as_label(mapping.get(str(index)), index)


def _as_label(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        strings = [v for v in value if isinstance(v, str)]
        if strings:
            return strings[-1]
    return str(index)


def map_class_to_label(
    probs: list[list[float]],
    mapping: dict[str, Any] | None = None,
    lbl_classes: list[list[int]] | None = None,
) -> list[dict[str, float]]:
    """TorchServe's helper: per row, ``{label: probability}`` for the given class indices."""
    if lbl_classes is None:
        lbl_classes = [list(range(len(row))) for row in probs]
    return [
        {label_for(mapping, int(c)): float(p) for c, p in zip(classes, row, strict=False)}
        for classes, row in zip(lbl_classes, probs, strict=False)
    ]
