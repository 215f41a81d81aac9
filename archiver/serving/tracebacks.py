"""Tracebacks and messages that point at the user's code: only the archive's own files, by name.

A handler's exception passes through our loader, worker and (for built-in handlers) our handler
package; a full traceback buries the one line its author needs under ours. ``user_trace`` keeps the
frames whose file lies in the model folder (where the archive was unpacked), as paths relative to it,
innermost last, at most a few, and the exception line. ``error_block`` is how the server's log and
``model-archiver predict`` print them::

    handler error in model "m": ValueError: bad input
      handler.py:12 in MyHandler.preprocess: x = to_tensor(row)
      utils.py:4 in to_tensor: raise ValueError("bad input")

An answer to a client carries one line, ``public_message``: the exception's summary (for a TorchScript
error, the last line of its serialized traceback, which is the one that says what failed) with every
absolute path shortened by ``redact_paths``: files of the archive relative to it, files of an
installed package relative to ``site-packages`` or the standard library, anything else to its name.
So an answer never tells a client where the interpreter, the virtual environment, the cache or the
server's source live (the server's log keeps the full lines).
"""

from __future__ import annotations

import linecache
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

# Frames shown at most (the innermost ones); a deep recursion in the handler stays a few lines.
MAX_FRAMES = 5
# A generated or minified line is cut: the block stays a few short lines.
MAX_CODE_CHARS = 200
# The one line an answer quotes from an exception is cut here.
MAX_MESSAGE_CHARS = 1000
# An absolute path: a "/" that starts a word (not one inside a URL or a relative path), then
# characters up to a space, a quote, a bracket or a separator; at least two components.
_ABSOLUTE_PATH = re.compile(r"(?<![\w/:.~-])/[^\s\"'`<>|,;:()\[\]{}/]+(?:/[^\s\"'`<>|,;:()\[\]{}/]*)+")
_PACKAGES = ("/site-packages/", "/dist-packages/")
_STDLIB = re.compile(r"/lib/python\d+(?:\.\d+)?/")
_TORCHSCRIPT = "The following operation failed in the TorchScript interpreter"
# The folder holding our own packages (archiver/, handlers/): a source checkout or site-packages.
_SOURCE_ROOT = Path(__file__).resolve().parents[2].as_posix()


@dataclass(frozen=True)
class UserFrame:
    """One frame in the archive's own code: ``file`` is relative to the model folder (``/``-separated)."""

    file: str
    line: int
    function: str
    code: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line} in {self.function}"
        return f"{where}: {self.code}" if self.code else where


@dataclass(frozen=True)
class UserTrace:
    """The exception as one line, and its frames in the archive's files (innermost last)."""

    exception: str
    frames: tuple[UserFrame, ...] = ()
    omitted: int = 0  # earlier frames in the archive's files, left out

    @property
    def where(self) -> str | None:
        """``handler.py:42``: the innermost frame in the archive, if any."""
        return f"{self.frames[-1].file}:{self.frames[-1].line}" if self.frames else None

    def frame_lines(self, indent: str = "  ") -> list[str]:
        lines = [f"{indent}... {self.omitted} earlier frames"] if self.omitted else []
        return lines + [f"{indent}{frame}" for frame in self.frames]


def exception_line(exc: BaseException) -> str:
    """``ValueError: bad input``: the type and the first line of the message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def user_trace(exc: BaseException, model_dir: str | Path, *, limit: int = MAX_FRAMES) -> UserTrace:
    """The frames of ``exc`` that run the archive's files in ``model_dir``.

    Our wrappers (the loader's HandlerError raised ``from`` the handler's exception) have none of their
    own, so the chain is followed (causes, then implicit contexts) to the first exception that does;
    when none has, the trace names ``exc`` alone. A SyntaxError in an archive file names its line too.
    """
    root = _resolved(model_dir)
    for candidate in _chain(exc):
        frames = _archive_frames(candidate, root)
        if frames:
            kept = frames[-limit:] if limit > 0 else []
            return UserTrace(exception_line(candidate), tuple(kept), len(frames) - len(kept))
    return UserTrace(exception_line(exc))


def error_block(title: str, trace: UserTrace) -> str:
    """``{title}: {exception}`` and one indented line per frame: the server's log, predict's stderr."""
    return "\n".join([f"{title}: {trace.exception}", *trace.frame_lines()])


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return chain


def _archive_frames(exc: BaseException, root: Path) -> list[UserFrame]:
    frames: list[UserFrame] = []
    resolved: dict[str, str | None] = {}
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        filename = code.co_filename
        if filename not in resolved:
            resolved[filename] = _relative(filename, root)
        relative = resolved[filename]
        if relative is None or lineno is None:
            continue
        if frames and (frames[-1].file, frames[-1].line) == (relative, lineno):
            continue  # a comprehension's own frame (Python < 3.12) repeats the line that called it
        function = getattr(code, "co_qualname", code.co_name)
        frames.append(UserFrame(relative, lineno, function, _source_line(filename, lineno)))
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        # The compiler's error has no frame of its own in the file: its location is on the exception.
        relative = _relative(exc.filename, root)
        if relative is not None:
            code_line = _clip((exc.text or "").strip()) or _source_line(exc.filename, exc.lineno)
            frames.append(UserFrame(relative, exc.lineno, "<module>", code_line))
    return frames


def _resolved(path: str | Path) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(path).absolute()


def _relative(filename: str, root: Path) -> str | None:
    if not filename or filename.startswith("<"):
        return None  # <frozen importlib._bootstrap>, <string>
    try:
        return _resolved(filename).relative_to(root).as_posix()
    except ValueError:
        return None


def _source_line(filename: str, lineno: int) -> str:
    linecache.checkcache(filename)  # the file may have been edited since it was first read
    return _clip(linecache.getline(filename, lineno).strip())


def _clip(code: str) -> str:
    return code if len(code) <= MAX_CODE_CHARS else code[: MAX_CODE_CHARS - 1] + "…"


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
    root = _resolved(model_dir).as_posix() + "/" if model_dir is not None else None

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
