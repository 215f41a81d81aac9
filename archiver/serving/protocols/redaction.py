"""One line about an exception for an answer, with no absolute path in it: used on every host.

An answer to a client carries one line, ``public_message``: the exception's summary (for a TorchScript
error, the last line of its serialized traceback, which is the one that says what failed) with every
absolute path shortened by ``redact_paths``: files of the archive relative to it, files of an
installed package relative to ``site-packages`` or the standard library, anything else to its name.
So an answer never tells a client where the interpreter, the virtual environment, the cache or the
server's source live (the server's log keeps the full lines).
"""

from __future__ import annotations

import re
from pathlib import Path

# The one line an answer quotes from an exception is cut here.
MAX_MESSAGE_CHARS = 1000
# An absolute path: a "/" that starts a word (not one inside a URL or a relative path), then
# characters up to a space, a quote, a bracket or a separator; at least two components.
_ABSOLUTE_PATH = re.compile(r"(?<![\w/:.~-])/[^\s\"'`<>|,;:()\[\]{}/]+(?:/[^\s\"'`<>|,;:()\[\]{}/]*)+")
_PACKAGES = ("/site-packages/", "/dist-packages/")
_STDLIB = re.compile(r"/lib/python\d+(?:\.\d+)?/")
_TORCHSCRIPT = "The following operation failed in the TorchScript interpreter"
# The folder holding our own packages (archiver/, handlers/): a source checkout or site-packages.
_SOURCE_ROOT = Path(__file__).resolve().parents[3].as_posix()


def resolved_path(path: str | Path) -> Path:
    """``path`` resolved, or made absolute when it cannot be (a loop of links, a vanished folder)."""
    try:
        return Path(path).resolve()
    except OSError:
        return Path(path).absolute()


def public_message(exc: BaseException, model_dir: str | Path | None = None) -> str:
    """The one line an answer quotes for ``exc``: its summary with paths shortened (``redact_paths``).

    The summary is the first line of the message, except for a TorchScript error, whose first line
    only says that the interpreter failed and whose last says how; the type's name when there is none.
    """
    try:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    except Exception:  # noqa: BLE001 - an exception whose __str__ itself fails
        lines = []
    if not lines:
        return type(exc).__name__
    line = lines[-1] if lines[0].startswith(_TORCHSCRIPT) else lines[0]
    if len(line) > MAX_MESSAGE_CHARS:
        line = line[: MAX_MESSAGE_CHARS - 1] + "…"
    return redact_paths(line, model_dir)


def redact_paths(text: str, model_dir: str | Path | None = None) -> str:
    """``text`` with each absolute path shortened: relative to ``model_dir`` (the archive's own files),
    after ``site-packages`` or the standard library's folder (an installed module), relative to the
    folder of our own packages, else to its last part (``…/name``)."""
    if "/" not in text:
        return text
    root = resolved_path(model_dir).as_posix() + "/" if model_dir is not None else None

    def shorten(found: re.Match[str]) -> str:
        path = found.group(0)
        if root is not None and path.startswith(root):
            return path[len(root) :]
        at = max(path.rfind(marker) + len(marker) if marker in path else -1 for marker in _PACKAGES)
        if at > 0:
            return path[at:]
        stdlib = _STDLIB.search(path)
        if stdlib is not None:
            return path[stdlib.end() :]
        if path.startswith(_SOURCE_ROOT + "/"):
            return path[len(_SOURCE_ROOT) + 1 :]
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return f"…/{name}" if name else "…"

    return _ABSOLUTE_PATH.sub(shorten, text)
