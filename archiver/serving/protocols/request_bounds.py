"""How much work one request may ask for, refused before the work is done: items per request and room
in the model's queue.

A request's body is bounded in bytes (``max_request_size``), but not what those bytes unfold into: a
KServe v1 body of 600 KB holds 300,000 instances, and each instance becomes a request of its own in
the model's queue. So every host counts a request's items (v1 instances, v2 input tensors, form fields)
against ``max_request_items`` before it makes anything of them (413), and a v1 request whose instances
do not fit in the queue's free room is refused whole (503, as a full queue is) rather than queued in
part. No aiohttp and no torch: the bundled server, Ray Serve and KServe hosts all use it.
"""

from __future__ import annotations

from archiver.errors import RequestTooLargeError, ServiceUnavailableError
from archiver.serving.protocols.media_types import boundary, mime_type

# The largest request body in bytes by default (TorchServe's max_request_size); every host's default.
DEFAULT_MAX_REQUEST_SIZE = 6553500
# One request never needs more items than the largest batch a model may run (settings_bounds:
# batch_size <= 1024), and 1024 small items cost the front a few MB at most.
DEFAULT_MAX_REQUEST_ITEMS = 1024


def check_items(count: int, limit: int, what: str, *, exact: bool = True) -> None:
    """413 when a request carries more than ``limit`` items (``what``: "v1 instances", …); ``exact``
    False when ``count`` is a bound or a running count rather than the request's own figure."""
    if count > limit:
        has = f"{count} {what}, more than" if exact else f"more {what} than"
        raise RequestTooLargeError(
            f"the request has {has} the server's limit of {limit} per request (--max-request-items)"
        )


def check_queue_room(count: int, free: int, model: str) -> None:
    """503 when ``count`` requests (the instances of one v1 call) do not fit in the queue's free room."""
    if count > free:
        raise ServiceUnavailableError(
            f'model "{model}" is overloaded: its queue has room for {free} more requests and this one '
            f"has {count} instances; retry later or send fewer"
        )


def form_fields_at_most(body: bytes, content_type: str | None) -> int:
    """An upper bound on the fields of a form body, counted without parsing it (0 if not a form).

    Multipart: the delimiter lines (``--`` and the boundary) in the body, one per part and one more
    that closes the body (a body without it is refused by the parser); url-encoded: one field per
    ``&``-separated piece.
    """
    mime = mime_type(content_type)
    if mime == "application/x-www-form-urlencoded":
        return body.count(b"&") + 1
    if mime != "multipart/form-data":
        return 0
    token = boundary(content_type)
    if not token:
        return 0  # the multipart parser refuses it, with its own message
    return max(0, body.count(b"--" + token) - 1)
