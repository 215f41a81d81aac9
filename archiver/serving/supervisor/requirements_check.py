"""What an archive's requirementsFile may ask pip for (serve --install-model-deps), checked before pip runs.

What it may ask for is limited (:func:`check_requirements`), because it comes with the
archive while pip runs with the operator's rights and configuration: requirement specifiers, ``name @
https://...`` and ``git+https://`` references, ``--hash`` and a few harmless global options. Refused:
``-r``/``-c`` (other files), ``-e`` (editable installs), local paths and ``file:`` URLs (files of the
server's machine, which also would not be part of the cache key), ``-i``/``--extra-index-url``/
``--find-links``/``--trusted-host`` (where packages come from is the operator's pip configuration, not
the archive's: an extra index is the classic dependency-confusion attack), plain ``http://`` URLs, and
``${VAR}`` (pip would expand the server's environment variables into URLs it fetches).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator

from archiver.errors import DependencyError

# Global options a requirements file may carry: none of them reads a file or changes where packages
# come from. Exact names only (pip's option parser would also take unique abbreviations; we do not).
_FLAG_OPTIONS = {"--pre", "--prefer-binary", "--require-hashes"}
_VALUE_OPTIONS = {"--only-binary", "--no-binary"}
_URL_SCHEMES = ("https://", "git+https://")
_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tar")
# A plain named requirement (PEP 508 without URLs), and nothing after it: pip reads a line that ends
# in an archive's suffix as a file of the server's machine (``x~=1 .tar.gz``), so every character of
# the line must be accounted for. Versions take no spaces or slashes; markers no paths or URLs.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_VERSION = r"(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9_.*+!-]+"
_VERSIONS = rf"{_VERSION}(?:\s*,\s*{_VERSION})*"
_NAME_REQUIREMENT = re.compile(
    rf"{_NAME}"  # the project name
    rf"\s*(?:\[\s*(?:{_NAME}(?:\s*,\s*{_NAME})*)?\s*\])?"  # extras
    rf"\s*(?:{_VERSIONS}|\(\s*{_VERSIONS}\s*\))?"  # version specifiers
    r"\s*(?:;[\w\s.'\"<>=!~(),*+-]*)?"  # environment markers
)
_URL_REQUIREMENT = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*\s*(?:\[[^\]]*\])?)\s*@\s*(?P<url>\S+)(?P<rest>.*)"
)
_COMMENT = re.compile(r"(^|\s+)#.*$")


def check_requirements(data: bytes, name: str = "requirements.txt") -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped), or
    DependencyError naming the first line that asks for something refused (see the module's text)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DependencyError(f"{name} is not UTF-8 text") from exc
    requirements = []
    for number, line in _logical_lines(text):
        line = _COMMENT.sub("", line).strip()
        if not line:
            continue
        problem = _refusal(line)
        if problem:
            raise DependencyError(f"{name} line {number}: {line[:120]!r}: {problem}")
        if not line.startswith("-"):
            requirements.append(line)
    return requirements


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines as pip reads them: a line ending in a backslash continues on the next one."""
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if line.endswith("\\") and not _COMMENT.search(line):
            pending.append(line[:-1])
            continue
        pending.append(line)
        yield start, " ".join(pending)
        pending = []
    if pending:
        yield start, " ".join(pending)


def _refusal(line: str) -> str | None:
    """Why ``line`` (comment-free, stripped) is refused, or None."""
    if "${" in line:
        return "environment variables (${...}) are not expanded: pip would put the server's values in URLs"
    tokens = line.split()
    first_option = next((i for i, token in enumerate(tokens) if token.startswith("-")), len(tokens))
    requirement, options = " ".join(tokens[:first_option]), " ".join(tokens[first_option:])
    problem = _option_refusal(options, per_requirement=bool(requirement))
    if problem or not requirement:
        return problem
    return _requirement_refusal(requirement)


def _option_refusal(options: str, *, per_requirement: bool) -> str | None:
    try:
        words = shlex.split(options)
    except ValueError as exc:
        return f"cannot read its options: {exc}"
    allowed_values = {"--hash"} if per_requirement else _VALUE_OPTIONS
    allowed_flags = set() if per_requirement else _FLAG_OPTIONS
    words.reverse()
    while words:
        word = words.pop()
        option, equals, _value = word.partition("=")
        if option in allowed_flags and not equals:
            continue
        if option in allowed_values:
            if not equals:
                if not words:
                    return f"{option} needs a value"
                words.pop()
            continue
        return _option_reason(option)
    return None


def _option_reason(option: str) -> str:
    if option in ("-r", "--requirement", "-c", "--constraint"):
        return "other files are not read (put every requirement in this one)"
    if option in ("-e", "--editable"):
        return "editable installs are refused (they install from a path or a checkout)"
    if option in (
        "-i",
        "--index-url",
        "--extra-index-url",
        "--no-index",
        "-f",
        "--find-links",
        "--trusted-host",
    ):
        return (
            "where packages come from is not the archive's to choose; "
            "set it in the server's pip configuration (pip.conf, PIP_INDEX_URL)"
        )
    if not option.startswith("-"):
        return f"unexpected {option!r} among the options"
    return (
        f"the option {option} is refused (allowed: --hash, "
        + ", ".join(sorted(_FLAG_OPTIONS | _VALUE_OPTIONS))
        + ")"
    )


def _requirement_refusal(requirement: str) -> str | None:
    if "://" in requirement or requirement.lower().startswith(("file:", "git+", "hg+", "svn+", "bzr+")):
        match = _URL_REQUIREMENT.fullmatch(requirement)
        url = match.group("url") if match else requirement.split()[0]
        if match and ("/" in match.group("rest") or "\\" in match.group("rest")):
            return "a path or URL after the reference is refused"
        if not url.lower().startswith(_URL_SCHEMES):
            return "only https:// and git+https:// URLs are installed (no file:, http:, ssh or other schemes)"
        return None
    if "/" in requirement or "\\" in requirement or requirement.startswith((".", "~")) or "@" in requirement:
        return "local paths are refused (they name files of the server's machine, not of the archive)"
    name = re.split(r"[\s\[<>=!~(;]", requirement, maxsplit=1)[0]
    # pip looks at the text before the markers, less trailing extras, as a file name: "x==1.tar.gz"
    head = re.sub(r"\[[^\]]*\]$", "", requirement.split(";", 1)[0].strip())
    if name.lower().endswith(_ARCHIVE_SUFFIXES) or head.lower().endswith(_ARCHIVE_SUFFIXES):
        return "local archive files are refused (they name files of the server's machine)"
    if not _NAME_REQUIREMENT.fullmatch(requirement):
        return "not a requirement specifier (name, extras, versions, markers)"
    return None


# ---- the environment ------------------------------------------------------------------------------
