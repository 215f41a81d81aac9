"""Tensor values as the Open Inference Protocol carries them: datatypes, JSON lists <-> little-endian
bytes, BYTES elements with their 4-byte lengths, and JSON parsing with a nesting limit.

No torch or numpy: struct does the packing, in C, so the front and the worker share it.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from archiver.errors import TensorRequestError

# Marks a request the front made from a v2 or v1 call (values "v2", "v2-body"); set by the front only,
# and removed from what a client sent, so a client cannot pose as one.
PROTOCOL_HEADER = "x-archiver-protocol"
# A tensor's data nested deeper than this is refused (one level per dimension, so 64 is far beyond any
# real request); deeper JSON anywhere stops at Python's parser's own limit.
MAX_JSON_DEPTH = 64

# datatype -> (struct format letter, bytes per element); BYTES has no fixed size, BF16 no struct letter.
DATATYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("?", 1),
    "UINT8": ("B", 1),
    "UINT16": ("H", 2),
    "UINT32": ("I", 4),
    "UINT64": ("Q", 8),
    "INT8": ("b", 1),
    "INT16": ("h", 2),
    "INT32": ("i", 4),
    "INT64": ("q", 8),
    "FP16": ("e", 2),
    "FP32": ("f", 4),
    "FP64": ("d", 8),
    "BF16": ("", 2),
    "BYTES": ("", 0),
}
# The 4-byte little-endian length before each BYTES element (the binary extension's layout).
ELEMENT_LENGTH = struct.Struct("<I")


def check_datatype(datatype: Any, what: str) -> str:
    """``datatype`` when it is one of ``DATATYPES``; else TensorRequestError (400) naming ``what``."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        known = ", ".join(DATATYPES)
        raise TensorRequestError(f"{what} has unknown datatype {datatype!r} (known: {known})")
    return datatype


def check_shape(shape: Any, what: str) -> list[int]:
    """``shape`` when it is a list of integers >= 0, at most MAX_JSON_DEPTH long; else TensorRequestError."""
    ok = type(shape) is list and all(type(d) is int and d >= 0 for d in shape)  # bool is not int here
    if not ok:
        raise TensorRequestError(f"{what} needs a shape that is a list of integers >= 0, got {shape!r}")
    if len(shape) > MAX_JSON_DEPTH:
        raise TensorRequestError(f"{what} has {len(shape)} dimensions, more than {MAX_JSON_DEPTH}")
    return shape


def flatten(data: Any, what: str) -> list[Any]:
    """Nested (row-major) or flat ``data`` as one flat list; non-lists are single elements."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []
    stack = [(iter(data), 0)]
    while stack:
        items, depth = stack[-1]
        for item in items:
            if isinstance(item, list):
                if depth + 1 >= MAX_JSON_DEPTH:
                    raise TensorRequestError(f"the data of {what} is nested too deep")
                stack.append((iter(item), depth + 1))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _bf16(values: list[Any]) -> bytes:
    """float32 rounded to bfloat16 (round to nearest even), little-endian."""
    out = bytearray()
    for bits in struct.unpack(f"<{len(values)}I", struct.pack(f"<{len(values)}f", *values)):
        if (bits & 0x7F800000) == 0x7F800000 and bits & 0x7FFFFF:  # NaN stays a quiet NaN
            out += struct.pack("<H", (bits >> 16) | 0x40)
        else:
            out += struct.pack("<H", ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)
    return bytes(out)


def pack_values(datatype: str, values: list[Any], what: str) -> tuple[bytes, bool]:
    """A flat list of JSON values as the datatype's bytes; (bytes, True when BYTES came as text).

    Raises TensorRequestError naming ``what`` for a value the datatype cannot hold.
    """
    if datatype == "BYTES":
        out = bytearray()
        text = False
        for v in values:
            if isinstance(v, str):
                v, text = v.encode("utf-8"), True
            elif not isinstance(v, (bytes, bytearray, memoryview)):
                raise TensorRequestError(f"{what} is BYTES: its elements must be strings, got {v!r:.40}")
            out += ELEMENT_LENGTH.pack(len(v))
            out += v
        return bytes(out), text
    if datatype == "BOOL" and not all(isinstance(v, bool) for v in values):
        bad = next(v for v in values if not isinstance(v, bool))
        raise TensorRequestError(f"{what} is BOOL: its elements must be true or false, got {bad!r:.40}")
    if datatype != "BOOL" and any(isinstance(v, bool) for v in values):
        raise TensorRequestError(f"{what} is {datatype}: true/false is not a number")
    try:
        if datatype == "BF16":
            return _bf16(values), False
        return struct.pack(f"<{len(values)}{DATATYPES[datatype][0]}", *values), False
    except (struct.error, OverflowError, TypeError) as exc:
        raise TensorRequestError(f"{what}: a value does not fit datatype {datatype} ({exc})") from None


def unpack_values(datatype: str, data: bytes | bytearray | memoryview, count: int, what: str) -> list[Any]:
    """The inverse of ``pack_values``: a flat list (BYTES elements as bytes)."""
    if datatype == "BYTES":
        return split_bytes_elements(data, count, what)
    if datatype == "BF16":
        half = struct.unpack(f"<{count}H", data)
        return list(struct.unpack(f"<{count}f", struct.pack(f"<{count}I", *(h << 16 for h in half))))
    return list(struct.unpack(f"<{count}{DATATYPES[datatype][0]}", data))


def split_bytes_elements(data: bytes | bytearray | memoryview, count: int, what: str) -> list[bytes]:
    """BYTES elements, each sent as a 4-byte little-endian length and its bytes; exactly ``count``."""
    view = memoryview(data)
    out: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise TensorRequestError(f"{what}: a BYTES element's 4-byte length is cut off")
        (size,) = ELEMENT_LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + size > len(view):
            raise TensorRequestError(f"{what}: a BYTES element of {size} bytes runs past its data")
        out.append(bytes(view[offset : offset + size]))
        offset += size
    if len(out) != count:
        raise TensorRequestError(f"{what}: its shape holds {count} elements but its data has {len(out)}")
    return out


def load_json(text: bytes | str, what: str = "request body") -> Any:
    """``json.loads`` with a nesting limit and 400s (TensorRequestError) for anything malformed."""
    try:
        # bytes decoded here: json.loads would first guess their encoding, which UTF-8 JSON never needs
        return json.loads(text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else text)
    except RecursionError:
        # The C parser counts its depth against Python's recursion limit and stops there; a tensor's
        # data deeper than MAX_JSON_DEPTH is refused later, by flatten.
        raise TensorRequestError(f"the {what} is JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TensorRequestError(f"the {what} is not valid JSON: {exc}") from None
