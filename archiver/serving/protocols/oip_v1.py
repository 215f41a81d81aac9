"""KServe v1 (``{"instances": [...]}``): each instance one element of the handler's batch, as
TorchServe's v1 envelope gives it; the answers back as ``{"predictions": [...]}``."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from archiver.errors import TensorRequestError
from archiver.serving.protocols.oip_values import PROTOCOL_HEADER, load_json
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_ITEMS, check_items
from archiver.serving.protocols.wire import RawRequest


def parse_v1_request(body: bytes, max_instances: int = DEFAULT_MAX_REQUEST_ITEMS) -> list[Any]:
    """The ``instances`` of a v1 ``:predict`` body; TensorRequestError (400) for anything else, and
    RequestTooLargeError (413) for more than ``max_instances``, before any instance is looked at
    (each becomes a request of its own in the model's queue)."""
    head = load_json(body)
    if not isinstance(head, dict) or not isinstance(head.get("instances"), list):
        raise TensorRequestError('a v1 predict body must be a JSON object {"instances": [...]}')
    if not head["instances"]:
        raise TensorRequestError("'instances' is empty: send at least one instance")
    check_items(len(head["instances"]), max_instances, "v1 instances")
    return head["instances"]


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise TensorRequestError(f"{what}: 'b64' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise TensorRequestError(f"{what}: 'b64' is not valid base64") from None


def v1_instance_parts(instance: Any, what: str = "instance") -> list[tuple[str, bytes, str]]:
    """One v1 instance as the parts of a handler row (TorchServe's v1 envelope decoding).

    ``{"b64": "..."}`` and ``{"data": {"b64": "..."}}`` become the bytes under ``data``; a
    ``{"data": "<base64>"}`` image stays text, which the vision handlers decode; any other object
    gives one JSON field per key; anything else (a list of numbers, a string) is the row's ``data``.
    """
    if isinstance(instance, dict):
        if list(instance) == ["b64"]:
            return [("data", _b64(instance["b64"], what), "application/octet-stream")]
        parts = []
        for key, value in instance.items():
            if isinstance(value, dict) and list(value) == ["b64"]:
                parts.append((key, _b64(value["b64"], what), "application/octet-stream"))
            else:
                parts.append((key, json.dumps(value).encode(), "application/json"))
        if not parts:
            raise TensorRequestError(f"{what} is an empty object")
        return parts
    return [("data", json.dumps(instance).encode(), "application/json")]


def v1_raw_request(instance: Any, request_id: str, headers: dict[str, str] | None = None) -> RawRequest:
    """One v1 instance as one element of a handler batch."""
    kept = {k: v for k, v in (headers or {}).items() if k.lower() != PROTOCOL_HEADER}
    return RawRequest(
        request_id=request_id, headers=kept, parts=v1_instance_parts(instance, f"instance {request_id}")
    )


def v1_prediction(answer: InferenceResponse) -> Any:
    """One handler answer as a v1 prediction: JSON as parsed, text as str, other bytes as {"b64"}."""
    mime = (answer.content_type or "").split(";", 1)[0].strip().lower()
    if mime == "application/json":
        try:
            return json.loads(answer.body)
        except (ValueError, RecursionError):  # not JSON after all, or nested past the parser: as text
            pass
    if mime.startswith("text/") or mime == "application/json":
        return answer.body.decode("utf-8", errors="replace")
    return {"b64": base64.b64encode(answer.body).decode()}


def build_v1_response(answers: list[InferenceResponse]) -> bytes:
    """``{"predictions": [...]}``, one prediction per instance, in order (all answers successful)."""
    return json.dumps({"predictions": [v1_prediction(a) for a in answers]}).encode()
