"""What a handler author imports: ``from handlers import BaseHandler, Context, HandlerInputError``.

``BaseHandler`` (and with it torch) is imported on first use, so a handler that needs only
``HandlerInputError`` or ``Context`` runs in a worker process without torch's 600 MB.
"""

from typing import TYPE_CHECKING, Any

from archiver.errors import HandlerInputError
from handlers.context import Context

if TYPE_CHECKING:
    from handlers.base import BaseHandler

__all__ = ["BaseHandler", "Context", "HandlerInputError"]


def __getattr__(name: str) -> Any:
    if name == "BaseHandler":
        from handlers.base import BaseHandler

        return BaseHandler
    raise AttributeError(f"module 'handlers' has no attribute {name!r}")
