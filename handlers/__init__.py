"""What a handler author imports: ``from handlers import BaseHandler, Context, HandlerInputError``."""

from archiver.errors import HandlerInputError
from handlers.base import BaseHandler
from handlers.context import Context

__all__ = ["BaseHandler", "Context", "HandlerInputError"]
