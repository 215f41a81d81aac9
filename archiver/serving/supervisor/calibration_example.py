"""The request a model is calibrated on: what its clients would send, made without its handler.

A small generated PNG for the built-in image handlers and for a custom handler whose file opens
images (PIL) or extends them, whatever the model's signature says (that is the tensor its preprocess
makes); else a v2 request of zeros shaped by the signature (model-config.yaml ``signature:`` or a
torch.export program); None when there is no way to make one.
Split from calibration.py, which decides what to do with the timings.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

from archiver.errors import ArchiverError
from archiver.serving.protocols.wire import RawRequest

_MAX_EXAMPLE_ELEMENTS = 1 << 22  # a signature of bigger tensors is not calibrated on (4M zeros of JSON)
_VISION = ("image_classifier", "image_segmenter", "object_detector")
# in a custom handler's file: it reads pictures (PIL), or extends one of the image handlers
_IMAGE_MARKS = ("Image.open(", "ImageClassifier", "VisionHandler", "ImageSegmenter", "ObjectDetector")
_MAX_HANDLER_BYTES = 1 << 20


def example_request(image: bool, signature_inputs: list[dict[str, Any]]) -> RawRequest | None:
    """A request like a client's for this model (a picture for a handler that reads images, else a v2
    request shaped by its signature), or None when there is no way to make one."""
    if image:
        return RawRequest("calibration", {"content-type": "image/png"}, [("body", _png(256), "image/png")])
    if not signature_inputs:
        return None
    inputs = []
    for spec in signature_inputs:
        shape = [d if d > 0 else 1 for d in spec["shape"]]  # a dynamic dimension: 1 (the batch)
        size = math.prod(shape)
        if spec["datatype"] == "BYTES" or size > _MAX_EXAMPLE_ELEMENTS:
            return None
        zero = False if spec["datatype"] == "BOOL" else 0
        inputs.append(
            {"name": spec["name"], "shape": shape, "datatype": spec["datatype"], "data": [zero] * size}
        )
    from archiver.serving.protocols.oip import body_raw_request

    body = json.dumps({"inputs": inputs}, separators=(",", ":")).encode()
    return body_raw_request(body, None, "calibration", {"content-type": "application/json"})


def _png(side: int) -> bytes:
    """A ``side`` x ``side`` RGB gradient PNG, made without an imaging library (the front has none);
    every row alike, so it takes microseconds to make (the handler still decodes and resizes it)."""
    row = b"\0" + bytes(v for x in range(side) for v in (x % 256, (3 * x) % 256, (255 - x) % 256))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    head = struct.pack("!IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(row * side)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def example_and_key(entry: Any) -> tuple[RawRequest, str] | None:
    """The example request and the archive's content sha256 (blocking: reads the archive)."""
    from archiver.reader import open_archive
    from archiver.serving.protocols.oip_metadata import read_signature
    from archiver.unpack_cache import content_key

    manifest = entry.manifest or {}
    handler = str((manifest.get("model") or {}).get("handler") or "")
    try:
        inputs = [] if handler in _VISION else read_signature(entry.source, manifest)[0]
    except (ArchiverError, OSError, ValueError, KeyError, TypeError):
        inputs = []
    # A handler that opens pictures is sent one even when the model has a signature: the signature
    # describes the tensor its preprocess makes, not what its clients send (an AOTInductor ResNet).
    image = handler in _VISION or _reads_images(entry.source, handler)
    request = example_request(image, inputs)
    if request is None:
        return None
    if entry.signature is not None:
        return request, entry.signature.sha256
    try:
        with open_archive(entry.source) as reader:
            return request, content_key(reader)
    except (ArchiverError, OSError):
        return None


def _reads_images(source: Path, handler: str) -> bool:
    """Whether a custom handler's own file opens images (PIL's ``Image.open``) or extends one of the
    image handlers: then a picture is what its clients send."""
    from archiver.handler_spec import handler_file_in_archive
    from archiver.reader import open_archive

    try:
        name = handler_file_in_archive(handler)
        if not name:
            return False
        with open_archive(source) as reader:
            if reader.size(name) > _MAX_HANDLER_BYTES:
                return False
            text = reader.read(name).decode("utf-8", "replace")
    except (ArchiverError, OSError, ValueError):
        return False
    return any(mark in text for mark in _IMAGE_MARKS)
