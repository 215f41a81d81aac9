"""The front page and docs/ hold together: links lead somewhere, and documented commands are real ones.

The walkthroughs are run verbatim elsewhere (test_resnet34_readme.py runs the front page's tour,
test_demo.py the demo); these checks are cheap, and cover every page, including reference pages whose
command lines are examples with the reader's own files.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from archiver.cli import cli

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md"))
# The examples' READMEs are run verbatim by their own tests; their links are checked here too.
PAGES = [REPO / "README.md", *DOCS, *sorted((REPO / "examples").glob("*/README.md"))]
PAGE_IDS = [str(page.relative_to(REPO)) for page in PAGES]
# Fenced blocks and inline code hold examples, not links.
FENCED = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_TARGET = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)=["']([^"']+)["']""", re.I)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
HTML_ANCHOR = re.compile(r"""<[^>]+\b(?:id|name)=["']([^"']+)["']""", re.I)


def prose(text: str) -> str:
    return INLINE_CODE.sub("", FENCED.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCED.sub("", page.read_text())
    found: set[str] = set(HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for _, title in HEADING.findall(text):
        slug = github_slug(title)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")  # GitHub numbers repeated headings
    return found


def relative_links(page: Path) -> list[str]:
    text = prose(page.read_text())
    targets = LINK.findall(text) + HTML_TARGET.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, mailto:, ...


def test_the_pages_are_found():
    names = {page.name for page in DOCS}
    assert {"index.md", "archiving.md", "handlers.md", "serving.md", "api.md"} <= names
    index = (REPO / "docs" / "index.md").read_text()
    for page in DOCS:
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not list {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_leads_to_a_file_or_anchor_that_exists(page: Path):
    broken = []
    for target in relative_links(page):
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(
                f"{target} (no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})"
            )
        elif not dest.is_relative_to(REPO):
            broken.append(f"{target} (outside the repository)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading or id {fragment!r} in {dest.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)} has broken links:\n  " + "\n  ".join(broken)


def test_the_slugs_are_githubs():
    assert github_slug("Serving: `model-archiver serve` and `model-archiver predict`") == (
        "serving-model-archiver-serve-and-model-archiver-predict"
    )
    assert github_slug("What differs from TorchServe, and why") == "what-differs-from-torchserve-and-why"
    assert github_slug("The `.mar` format") == "the-mar-format"
    assert github_slug("Management (port 8081)") == "management-port-8081"


def test_a_group_command_is_checked_against_its_subcommands():
    assert unknown_flags(["deploy", "ray", "a.mar", "-o", "serve_config.yaml"]) is None
    assert (
        unknown_flags(["deploy", "ray", "a.mar", "--no-such-flag"])
        == "deploy ray has no option --no-such-flag"
    )
    assert unknown_flags(["deploy", "nowhere", "a.mar"]) == "deploy has no subcommand 'nowhere'"


def test_a_broken_link_is_caught(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) `[code](not-a-link.md)`\n")
    assert relative_links(page) == ["#title", "missing.md"]
    assert "title" in anchors(page)


def documented_cli_calls(page: Path) -> list[list[str]]:
    """Each `model-archiver ...` invocation in the page's ```bash blocks, as argv after the program."""
    calls = []
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.S | re.M):
        for words in _commands(block):
            if words and Path(words[0]).name == "model-archiver":
                calls.append(words[1:])
    return calls


def _commands(block: str) -> list[list[str]]:
    """A bash block split into simple commands (continuations joined, comments, `&`, `&&`, `|`, `;` cut)."""
    lexer = shlex.shlex(block.replace("\\\n", " "), posix=True, punctuation_chars=";&|")
    lexer.whitespace = " \t\r"  # newlines end a command, as in bash
    lexer.commenters = "#"
    commands, current = [], []
    for word in iter(lexer.get_token, None):
        if word in {"\n", ";", "&", "&&", "|", "||"} or word.strip() == "":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in [*commands, current] if c]


def unknown_flags(argv: list[str]) -> str | None:
    """Why argv is not a command line the CLI accepts (subcommand and flags), or None if it is."""
    context = click.Context(cli, info_name="model-archiver")
    commands = cli.list_commands(context)
    if not argv or argv[0] in {"--about", "-h", "--help"}:
        return None
    name, args = (argv[0], argv[1:]) if not argv[0].startswith("-") else ("archive", argv)
    if name not in commands:
        return f"no subcommand {name!r} (there are {', '.join(commands)})"
    command = cli.get_command(context, name)
    assert command is not None
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):  # deploy ray ...
        sub = command.get_command(context, args[0])
        if sub is None:
            return f"{name} has no subcommand {args[0]!r}"
        name, command, args = f"{name} {args[0]}", sub, args[1:]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {
        "-h",
        "--help",
    }
    bad = [
        a.split("=", 1)[0] for a in args if a.startswith("-") and a != "-" and a.split("=", 1)[0] not in known
    ]
    return f"{name} has no option {', '.join(bad)}" if bad else None


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_documented_model_archiver_command_uses_real_subcommands_and_flags(page: Path):
    wrong = [
        f"model-archiver {shlex.join(argv)}: {why}"
        for argv in documented_cli_calls(page)
        if (why := unknown_flags(argv))
    ]
    assert not wrong, f"{page.relative_to(REPO)} documents command lines the CLI refuses:\n  " + "\n  ".join(
        wrong
    )


def test_the_command_check_catches_a_renamed_flag(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nmodel-archiver serve --model-store s --modles all &  # typo\n"
        "model-archiver --model-name m -v 1 \\\n    --handler h.py --serialised-file m.pt\n"
        "model-archiver frobnicate x\n.venv/bin/model-archiver verify m.mar && echo ok\n```\n"
    )
    calls = documented_cli_calls(page)
    assert calls == [
        ["serve", "--model-store", "s", "--modles", "all"],
        ["--model-name", "m", "-v", "1", "--handler", "h.py", "--serialised-file", "m.pt"],
        ["frobnicate", "x"],
        ["verify", "m.mar"],
    ]
    assert unknown_flags(calls[0]) == "serve has no option --modles"
    assert unknown_flags(calls[1]) == "archive has no option --serialised-file"
    assert unknown_flags(calls[2]).startswith("no subcommand 'frobnicate'")
    assert unknown_flags(calls[3]) is None


def test_the_readme_opens_with_the_two_commands():
    """Before any other code: the demo and the tests, as one copies them (test_demo.py runs the demo)."""
    first_block = FENCED.search((REPO / "README.md").read_text())
    assert first_block is not None
    lines = first_block.group(0).splitlines()
    assert lines[0] == "```bash"
    assert [line.split(" #")[0].rstrip() for line in lines[1:-1]] == [
        "./scripts/demo.sh",
        "./scripts/test.sh",
    ]
