"""What a --handler value means: a built-in handler, a handler file, or a module:function entry point.

The archiver and the server's loader both read handler strings; this module is the one place that
parses them, with TorchServe's conventions (``my_handler.py``, ``my_handler``, ``my_handler:fn``).
"""

from __future__ import annotations

from dataclasses import dataclass

# The default handlers this project ships (handlers/<name>.py). TorchServe's other built-ins
# (base_handler, dali_image_classifier, vllm_handler, trt_llm_handler) are not provided here.
BUILTIN_HANDLERS = ("image_classifier", "object_detector", "image_segmenter", "text_classifier")


@dataclass(frozen=True)
class HandlerSpec:
    """A parsed handler string. ``module`` is the importable name (no '.py', no folder)."""

    module: str
    function: str | None
    builtin: bool

    @property
    def file_name(self) -> str | None:
        """The handler module's file name inside the archive; None for built-ins."""
        return None if self.builtin else f"{self.module}.py"

    @property
    def manifest_value(self) -> str:
        """The string TorchServe stores in manifest.model.handler for this handler."""
        if self.builtin:
            return self.module if not self.function else f"{self.module}:{self.function}"
        if self.function:
            return f"{self.module}:{self.function}"
        return f"{self.module}.py"


def parse_handler(value: str) -> HandlerSpec:
    """Parse a handler string as TorchServe's loader does: split on ':', drop folders and '.py'."""
    module, _, function = value.partition(":")
    module = module.replace("\\", "/").rsplit("/", 1)[-1]
    had_py = module.endswith(".py")
    if had_py:
        module = module[: -len(".py")]
    builtin = module in BUILTIN_HANDLERS and not had_py and "/" not in value.partition(":")[0]
    return HandlerSpec(module=module, function=function or None, builtin=builtin)


def handler_file_in_archive(value: str) -> str | None:
    """The archive path of the handler module a manifest's handler string names, if it is custom."""
    return parse_handler(value).file_name
