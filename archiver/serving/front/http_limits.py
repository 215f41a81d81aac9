"""The limits every HTTP app of the front enforces: body size, read time, items, the token, the site."""

from __future__ import annotations

from dataclasses import dataclass

from archiver.serving.front.site_guard import SiteRules
from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_ITEMS, DEFAULT_MAX_REQUEST_SIZE


@dataclass(frozen=True)
class HttpLimits:
    """Request limits shared by the apps."""

    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    body_read_timeout_s: float = 60.0
    # v1 instances, v2 input tensors or form fields one request may carry (request_bounds.py)
    max_request_items: int = DEFAULT_MAX_REQUEST_ITEMS
    token: str | None = None
    # The host names and origins answered when there is no token (site_guard.py); None: every one.
    site: SiteRules | None = None
