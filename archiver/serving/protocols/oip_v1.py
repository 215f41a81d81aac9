"""KServe v1 (``{"instances": [...]}``): each instance one element of the handler's batch, as
TorchServe's v1 envelope gives it; the answers back as ``{"predictions": [...]}``."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from archiver.errors import TensorRequestError
from archiver.serving.protocols.media_types import mime_type
from archiver.serving.protocols.oip_values import load_json
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_ITEMS, check_items
from archiver.serving.protocols.wire import RawRequest, client_headers


def parse_v1_request(body: bytes, max_instances: int = DEFAULT_MAX_REQUEST_ITEMS) -> list[Any]:
    """The ``instances`` of a v1 ``:predict`` body; TensorRequestError (400) for anything else, and
    RequestTooLargeError (413) for more than ``max_instances``, counted from the bytes before any
    instance is parsed (each becomes a request of its own in the model's queue)."""
    try:
        start, end = _instances_span(bytes(body), max_instances)
        instances = load_json(body[start:end])
    except _OverBudget:  # a body of many small containers: the parser counts them (front: one at a time)
        head = load_json(body)
        if not isinstance(head, dict) or not isinstance(head.get("instances"), list):
            raise TensorRequestError(_SHAPE) from None
        instances = head["instances"]
        check_items(len(instances), max_instances, "v1 instances")
    if not instances:
        raise TensorRequestError("'instances' is empty: send at least one instance")
    return instances


# The v1 body's top level is walked here, token by token, and only its instances array is parsed.
# json.loads would build every value first: 6.5 MB of "{}," is 2 million dicts (120 MB) and half a
# second holding the GIL, for a body refused anyway. In a container, everything between strings and
# non-empty brackets (numbers, commas, "{}", "[]") is one token, so a run of flat or empty instances
# is counted in C (its commas), and the walk stops as soon as the count passes the limit. A walk of
# more than _TOKEN_BUDGET tokens (about 0.1 s: a body of many small non-empty containers) stops, and
# the whole body is parsed instead, as before; the front parses one large body at a time.
_TOKEN_BUDGET = 100_000


class _OverBudget(Exception):
    pass


_WS = re.compile(rb"[ \t\n\r]*+")
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_SCALAR = re.compile(rb'[^,:\[\]{}" \t\n\r]++')
_TOKEN = re.compile(
    # at most 4096 pieces a token, so a run of "{}," is counted (and refused) a few KB at a time
    rb'(?P<run>(?:[^"\[\]{}]++|\{[ \t\n\r]*+\}|\[[ \t\n\r]*+\]){1,4096}+)'
    rb'|(?P<str>"[^"\\]*+(?:\\.[^"\\]*+)*+")|(?P<open>[\[{])|(?P<close>[\]}])',
    re.DOTALL,
)
_SHAPE = 'a v1 predict body must be a JSON object {"instances": [...]}'


def _instances_span(body: bytes, limit: int) -> tuple[int, int]:
    """Where the (last, as json.loads takes it) ``instances`` array of ``body`` starts and ends; 413
    once it holds more than ``limit`` elements. Other keys' values are skipped, never parsed."""
    i = _skip_ws(body, 0)
    if body[i : i + 1] != b"{":
        raise TensorRequestError(_SHAPE)
    span: tuple[int, int] | None = None
    budget = [_TOKEN_BUDGET]  # tokens left for the whole body's walk
    i = _skip_ws(body, i + 1)
    while body[i : i + 1] != b"}":
        key = _STRING.match(body, i)
        if key is None:
            _invalid("a key")
        i = _skip_ws(body, key.end())  # type: ignore[union-attr]
        if body[i : i + 1] != b":":
            _invalid("':' after a key")
        i = _skip_ws(body, i + 1)
        if load_json(key.group()) == "instances":  # type: ignore[union-attr]
            if body[i : i + 1] != b"[":
                raise TensorRequestError(_SHAPE)
            span = (i, _walk(body, i, limit, budget))
            i = span[1]
        else:
            i = _skip_value(body, i, budget)
        i = _skip_ws(body, i)
        if body[i : i + 1] == b",":
            i = _skip_ws(body, i + 1)
            if body[i : i + 1] == b"}":
                _invalid("a key after ','")
        elif body[i : i + 1] != b"}":
            _invalid("',' or '}' after a value")
    if _skip_ws(body, i + 1) != len(body):
        _invalid("nothing after the object")
    if span is None:
        raise TensorRequestError(_SHAPE)
    return span


def _skip_ws(body: bytes, i: int) -> int:
    return _WS.match(body, i).end()  # type: ignore[union-attr] - it matches the empty string


def _skip_value(body: bytes, i: int, budget: list[int]) -> int:
    if body[i : i + 1] in (b"[", b"{"):
        return _walk(body, i, None, budget)
    found = (_STRING if body[i : i + 1] == b'"' else _SCALAR).match(body, i)
    if found is None:
        _invalid("a value")
    return found.end()  # type: ignore[union-attr]


def _walk(body: bytes, i: int, limit: int | None, budget: list[int]) -> int:
    """The end of the array or object opening at ``i``; with ``limit``, 413 once it has more elements
    than that (its commas at depth 1, plus one). Brackets are only counted: the parser checks the
    instances, and the other keys' values are never read."""
    depth, commas, i = 1, 0, i + 1  # the opening bracket taken here: a run never starts at depth 0
    while budget[0] > 0:
        budget[0] -= 1
        token = _TOKEN.match(body, i)
        if token is None:
            return _invalid("the end of an array or object")  # a string that never ends, or no more
        kind = token.lastgroup
        if kind == "open":
            depth += 1
        elif kind == "close":
            depth -= 1
            if depth == 0:
                return token.end()
        elif kind == "run" and depth == 1 and limit is not None:
            commas += body.count(b",", token.start(), token.end())
            if commas >= limit:  # commas + 1 elements
                check_items(commas + 1, limit, "v1 instances", exact=False)
        i = token.end()
    raise _OverBudget


def _invalid(expected: str) -> Any:
    raise TensorRequestError(f"the request body is not valid JSON: expected {expected}")


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
    kept = client_headers(headers)  # a client's x-archiver- headers are never the front's
    return RawRequest(
        request_id=request_id, headers=kept, parts=v1_instance_parts(instance, f"instance {request_id}")
    )


def v1_prediction(answer: InferenceResponse) -> Any:
    """One handler answer as a v1 prediction: JSON as parsed, text as str, other bytes as {"b64"}."""
    mime = mime_type(answer.content_type)
    if mime == "application/json":
        try:
            return json.loads(answer.body)
        except (ValueError, RecursionError):  # not JSON after all, or nested past the parser: as text
            pass
    if mime.startswith("text/") or mime == "application/json":
        return answer.body.decode("utf-8", errors="replace")
    return {"b64": base64.b64encode(answer.body).decode()}


def build_v1_response(answers: list[InferenceResponse], key: str = "predictions") -> bytes:
    """``{"predictions": [...]}`` (``{"explanations": [...]}`` for ``:explain``), one answer per
    instance, in order (all answers successful)."""
    return json.dumps({key: [v1_prediction(a) for a in answers]}).encode()
