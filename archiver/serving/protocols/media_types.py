"""The one reader of a Content-Type header: its media type and its multipart boundary.

Every host and every codec (form bodies, the request bounds that count a form's fields before it is
parsed, handler answers, v1 predictions, v2 outputs) reads a Content-Type here, so the counter and the
parser can never disagree on which boundary a body uses.
"""

from __future__ import annotations


def mime_type(content_type: str | None) -> str:
    """``text/plain; charset=utf-8`` → ``text/plain`` (lower case, no parameters)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def boundary(content_type: str | None) -> bytes:
    """The ``boundary`` parameter of a multipart Content-Type (quotes removed), b"" when it has none."""
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"').encode("latin-1", "replace")
    return b""
