"""Java ``.properties`` syntax, as ``java.util.Properties.load`` reads it: TorchServe's config.properties.

TorchServe reads its config.properties with Java's own loader, so a file written for it uses that
syntax's corners: ``#`` and ``!`` comments, ``=``, ``:`` or plain whitespace between key and value,
backslash escapes (``\\t``, ``\\uXXXX``, an escaped separator), and a trailing backslash that carries a
value on to the next line (the per-model JSON ``models={\\`` of TorchServe's docs is written that way).
Parsing it with a naive ``split("=")`` gets those wrong, so this module does what Java does, and keeps
the line each key started on so a bad value can be named with its line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from archiver.errors import ConfigError

MAX_PROPERTIES_BYTES = 1 << 20  # a config file, not a data file: TorchServe's are a few hundred bytes
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
# TorchServe's ConfigManager.resolveEnvVarVals: $$NAME$$ is the environment variable NAME (two or more
# characters, no "$"), and an unset one stops the start.
_PLACEHOLDER = re.compile(r"\$\$([^$]+[^$])\$\$")


@dataclass(frozen=True)
class Property:
    """One key's value and the line (1-based) its logical line starts on."""

    value: str
    line: int


def read_properties(path: Path) -> dict[str, Property]:
    """The file's properties (a later key wins, as in Java); ConfigError when unreadable or malformed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_PROPERTIES_BYTES:
        raise ConfigError(
            f"{path} is {len(data)} bytes: a config.properties is at most {MAX_PROPERTIES_BYTES}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # what Java's Properties.load(InputStream) always uses
    return parse_properties(text, str(path))


def parse_properties(text: str, source: str = "config.properties") -> dict[str, Property]:
    """Parse properties text; ``$$NAME$$`` in a value becomes that environment variable, as in
    TorchServe, and one that is not set is a ConfigError naming it, the key and the line."""
    out: dict[str, Property] = {}
    for line_no, logical in _logical_lines(text):
        key, value = _split(logical, source, line_no)

        def env(match: re.Match[str], key: str = key, line_no: int = line_no) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(
                    f"{source} line {line_no}: {key} uses $${name}$$, but the environment variable "
                    f"{name} is not set: set it, or write the value itself"
                )
            return os.environ[name]

        out[key] = Property(_PLACEHOLDER.sub(env, value), line_no)
    return out


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, the logical line with its continuations joined), comments and blanks out."""
    natural = re.split(r"\r\n|\r|\n", text)
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(natural):
        start = i
        line = natural[i].lstrip(" \t\f")
        i += 1
        if not line or line[0] in "#!":
            continue
        parts = []
        while _continues(line) and i < len(natural):
            parts.append(line[:-1])
            line = natural[i].lstrip(" \t\f")  # a continuation's leading whitespace is not part of it
            i += 1
        if _continues(line):
            line = line[:-1]  # a backslash at the very end of the file continues onto nothing
        parts.append(line)
        out.append((start + 1, "".join(parts)))
    return out


def _continues(line: str) -> bool:
    """Whether the line ends with an odd number of backslashes (an escaped backslash does not count)."""
    trailing = len(line) - len(line.rstrip("\\"))
    return trailing % 2 == 1


def _split(line: str, source: str, line_no: int) -> tuple[str, str]:
    """Key and value of one logical line, each unescaped."""
    i, n = 0, len(line)
    while i < n:
        char = line[i]
        if char == "\\":
            i += 2
            continue
        if char in "=: \t\f":
            break
        i += 1
    key_end = min(i, n)
    j = key_end
    while j < n and line[j] in " \t\f":
        j += 1
    if j < n and line[j] in "=:":
        j += 1
        while j < n and line[j] in " \t\f":
            j += 1
    return _unescape(line[:key_end], source, line_no), _unescape(line[j:], source, line_no)


def _unescape(raw: str, source: str, line_no: int) -> str:
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        char = raw[i]
        if char != "\\" or i + 1 >= n:
            out.append(char)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt == "u":
            digits = raw[i + 2 : i + 6]
            if len(digits) != 4 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ConfigError(f"{source}, line {line_no}: malformed \\uxxxx escape {raw[i : i + 6]!r}")
            out.append(chr(int(digits, 16)))
            i += 6
            continue
        out.append(_ESCAPES.get(nxt, nxt))
        i += 2
    return "".join(out)
