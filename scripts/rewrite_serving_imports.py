"""Rewrite references to archiver/serving's old flat module paths to the four folders (issue 20, step 1).

Run from the repository root, with file paths to rewrite (default: every text file git tracks). Safe to
run twice: a path already in a folder is left alone.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# old module name under archiver.serving -> new dotted path (relative to archiver)
MOVES = {
    **{
        m: f"serving.protocols.{m}"
        for m in (
            "wire",
            "http_codec",
            "answer_checks",
            "request_bounds",
            "oip",
            "oip_records",
            "oip_values",
            "oip_v1",
            "oip_answer",
            "oip_metadata",
        )
    },
    "protocol": "serving.protocols.records",
    **{
        m: f"serving.front.{m}"
        for m in (
            "app",
            "request_bodies",
            "oip_routes",
            "page_routes",
            "openapi",
            "openapi_ops",
            "oip_openapi",
            "metrics",
            "parse_errors",
            "site_guard",
            "server",
        )
    },
    **{
        m: f"serving.supervisor.{m}"
        for m in (
            "registry",
            "model_entry",
            "model_store",
            "batcher",
            "pool",
            "restart_policy",
            "worker_output",
            "worker_env",
            "reload",
            "devices",
            "placement",
            "signature_gate",
        )
    },
    "worker_process": "serving.supervisor.worker_handle",
    "model_env": "serving.supervisor.model_venvs",
    **{
        m: f"serving.worker.{m}"
        for m in ("loader", "isolation", "tracebacks", "oip_worker", "handler_answers")
    },
    "worker": "serving.worker.main",
    "cache": "unpack_cache",
    "memory": "heap_trim",
}
WORKER_MODULES = ("main", "loader", "isolation", "tracebacks", "oip_worker", "handler_answers")
FOLDERS = ("protocols", "front", "supervisor", "worker")

DOTTED = re.compile(r"\barchiver\.serving\.(\w+)(\.\w+)?")
PATH = re.compile(r"\barchiver/serving/(\w+)(\.py|/)")
FROM_SERVING = re.compile(r"^(\s*)from archiver\.serving import ([\w, ]+)$", re.M)


def _dotted(found: re.Match[str]) -> str:
    name, rest = found.group(1), found.group(2) or ""
    if name == "worker" and rest:
        return found.group(0)  # archiver.serving.worker.loader: already moved
    after = found.string[found.end() : found.end() + 40]
    if name == "worker" and re.match(r" import \(?\s*(" + "|".join(WORKER_MODULES) + r")\b", after):
        return found.group(0)  # from archiver.serving.worker import loader: already moved
    if name in FOLDERS and name != "worker":
        return found.group(0)
    if name not in MOVES:
        return found.group(0)
    return "archiver." + MOVES[name] + rest


def _path(found: re.Match[str]) -> str:
    name, tail = found.group(1), found.group(2)
    if name == "page" and tail == "/":
        return "archiver/serving/front/page/"
    if name not in MOVES or tail != ".py":
        return found.group(0)
    return "archiver/" + MOVES[name].replace(".", "/") + ".py"


def _from_serving(found: re.Match[str]) -> str:
    indent, names = found.group(1), [n.strip() for n in found.group(2).split(",") if n.strip()]
    groups: dict[str, list[str]] = {}
    for name in names:
        target = MOVES.get(name)
        if target is None:
            groups.setdefault("archiver.serving", []).append(name)
            continue
        package, _, module = ("archiver." + target).rpartition(".")
        entry = module if module == name else f"{module} as {name}"
        groups.setdefault(package, []).append(entry)
    return "\n".join(f"{indent}from {pkg} import {', '.join(sorted(mods))}" for pkg, mods in groups.items())


def rewrite(text: str) -> str:
    text = DOTTED.sub(_dotted, text)
    text = FROM_SERVING.sub(_from_serving, text)
    return PATH.sub(_path, text)


def main(paths: list[str]) -> None:
    if not paths:
        paths = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    for name in paths:
        path = Path(name)
        if path.suffix not in {".py", ".md", ".toml", ".sh", ".yml", ".yaml", ".cfg", ".txt", ".ini"}:
            continue
        if not path.is_file():
            continue
        old = path.read_text()
        new = rewrite(old)
        if new != old:
            path.write_text(new)
            print("rewrote", name)


if __name__ == "__main__":
    main(sys.argv[1:])
