"""Tracebacks and messages that point at the user's code: only the archive's own files, by name.

A handler's exception passes through our loader, worker and (for built-in handlers) our handler
package; a full traceback buries the one line its author needs under ours. ``user_trace`` keeps the
frames whose file lies in the model folder (where the archive was unpacked), as paths relative to it,
innermost last, at most a few, and the exception line. ``error_block`` is how the server's log and
``model-archiver predict`` print them::

    handler error in model "m": ValueError: bad input
      handler.py:12 in MyHandler.preprocess: x = to_tensor(row)
      utils.py:4 in to_tensor: raise ValueError("bad input")

An answer to a client carries one line: ``public_message`` in
``archiver/serving/protocols/redaction.py``, which every host uses.
"""

from __future__ import annotations

import linecache
import traceback
from dataclasses import dataclass
from pathlib import Path

from archiver.serving.protocols.redaction import resolved_path

# Frames shown at most (the innermost ones); a deep recursion in the handler stays a few lines.
MAX_FRAMES = 5
# A generated or minified line is cut: the block stays a few short lines.
MAX_CODE_CHARS = 200


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
    root = resolved_path(model_dir)
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


def _relative(filename: str, root: Path) -> str | None:
    if not filename or filename.startswith("<"):
        return None  # <frozen importlib._bootstrap>, <string>
    try:
        return resolved_path(filename).relative_to(root).as_posix()
    except ValueError:
        return None


def _source_line(filename: str, lineno: int) -> str:
    linecache.checkcache(filename)  # the file may have been edited since it was first read
    return _clip(linecache.getline(filename, lineno).strip())


def _clip(code: str) -> str:
    return code if len(code) <= MAX_CODE_CHARS else code[: MAX_CODE_CHARS - 1] + "…"
