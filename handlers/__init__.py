"""What a handler author imports: ``from handlers import BaseHandler, Context``."""
