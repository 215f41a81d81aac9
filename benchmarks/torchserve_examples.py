"""TorchServe v0.12's own examples, run unchanged on TorchServe 0.12 and on ours: the compatibility table.

    .venv/bin/python benchmarks/torchserve_examples.py                 # every offline example but the slow
    .venv/bin/python benchmarks/torchserve_examples.py --slow          # also the torch.compile ones
    .venv/bin/python benchmarks/torchserve_examples.py --only mnist --only stateful

For each example (``_examples_specs.EXAMPLES``): its files are taken from TorchServe's repository at
v0.12.0 (the fetched mirror), the weights its README downloads are made with random values by the
model file's own class (``torch.save(state_dict)``, or its export script with ``weights=None``), the
archive is built twice with the README's command line (``torch-model-archiver`` from .venv-ts, and
``model-archiver``), and three runs send the README's requests: TorchServe serving its archive, ours
serving ours, ours serving TorchServe's. Weights torchvision fetches while building a model (the
segmenters' and detectors' backbones) are put in a private TORCH_HOME the same way. Needs
benchmarks/setup_torchserve.sh (TorchServe 0.12 in .venv-ts) and Java. Prints a markdown table and
writes bench-out/torchserve-examples.json; work files go to --work (default /tmp/ts-examples).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO
from _examples_servers import (
    OUR_BIN,
    TS_ARCHIVER,
    SideResult,
    build_archive,
    difference,
    ours,
    run_side,
    torchserve,
)
from _examples_specs import EXAMPLES, Example, Weights

MIRROR = Path("/work/.mirror/pytorch+serve/repo")
TAG = "v0.12.0"
# Backbones torchvision downloads while a model file builds its model (the URL's file name).
HUB_WEIGHTS = {"resnet101-63fe2227.pth": "resnet101", "resnet50-0676ba61.pth": "resnet50"}
SIDES = ("torchserve", "ours", "ours (TorchServe's .mar)")

STATE_DICT = """
import importlib.util, inspect, sys, torch
path, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, str(__import__("pathlib").Path(path).parent))
spec = importlib.util.spec_from_file_location("example_model", path)
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
classes = [c for c in vars(module).values()
           if inspect.isclass(c) and c.__module__ == "example_model" and issubclass(c, torch.nn.Module)]
torch.manual_seed(0)
torch.save(classes[-1]().state_dict(), out)
"""


def checkout(work: Path) -> Path:
    """TorchServe's examples/ at v0.12.0, file by file (the mirror lacks a few binary blobs: the two
    weights files it lacks are made like the others)."""
    root = work / "serve"
    if (root / "examples" / ".complete").exists():
        return root
    names = subprocess.run(
        ["git", "-C", str(MIRROR), "ls-tree", "-r", "--name-only", TAG, "examples"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.split()  # fmt: skip
    wanted = {e.cwd.split("/")[1] for e in EXAMPLES if e.cwd != "."} | {"image_classifier", "image_segmenter"}
    wanted |= {"object_detector", "micro_batching", "custom_metrics", "stateful", "pt2"}
    for name in names:
        if name.split("/")[1] not in wanted:
            continue
        blob = subprocess.run(
            ["git", "-C", str(MIRROR), "show", f"{TAG}:{name}"], capture_output=True, timeout=60
        )
        if blob.returncode == 0 and blob.stdout:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(blob.stdout)
    (root / "examples" / ".complete").write_text("")
    return root


def make_weights(weights: Weights, cwd: Path, torch_home: Path) -> None:
    """The file the README downloads (or its script writes), made offline with random values."""
    out = cwd / weights.out
    if out.exists():
        return
    python = str(REPO / ".venv" / "bin" / "python")
    env_home = {"TORCH_HOME": str(torch_home), "PATH": "/usr/bin:/bin"}
    if weights.kind == "state_dict":
        cmd = [python, "-c", STATE_DICT, str(cwd / weights.model_file), str(out)]
    else:
        source = (cwd / weights.model_file).read_text()
        patched = source.replace("weights=ResNet18_Weights.DEFAULT", "weights=None")
        cmd = [python, "-c", patched]
    done = subprocess.run(cmd, cwd=cwd, env=env_home, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"making {weights.out} failed: {done.stderr.strip().splitlines()[-1:]}")


def hub_weights(torch_home: Path) -> None:
    """Random backbones where torchvision would download pretrained ones (private TORCH_HOME)."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for file, arch in HUB_WEIGHTS.items():
        if not (folder / file).exists():
            code = "import sys, torch, torchvision; "
            code += f"torch.save(torchvision.models.{arch}().state_dict(), sys.argv[1])"
            subprocess.run(
                [str(REPO / ".venv" / "bin" / "python"), "-c", code, str(folder / file)],
                check=True,
                timeout=300,
            )


def run_example(example: Example, root: Path, work: Path, torch_home: Path) -> dict:
    slug = example.name.replace("/", "_").replace(" ", "_").replace("(", "").replace(")", "")
    run = work / "runs" / slug
    results: dict[str, SideResult] = {}
    mars: dict[str, Path | str] = {}
    try:
        if example.weights:
            make_weights(example.weights, root / example.cwd, torch_home)
    except (RuntimeError, subprocess.SubprocessError) as exc:
        return {"name": example.name, "error": str(exc)}
    for tool, archiver in (("torchserve", TS_ARCHIVER), ("ours", OUR_BIN)):
        try:
            mars[tool] = build_archive(example, root, archiver, run / f"{tool}-archive")
        except (RuntimeError, subprocess.SubprocessError) as exc:
            mars[tool] = f"archive: {exc}"
    plan = (("torchserve", torchserve, "torchserve"), ("ours", ours, "ours"), (SIDES[2], ours, "torchserve"))
    for side, server, built_by in plan:
        mar = mars[built_by]
        if isinstance(mar, str):
            results[side] = SideResult(False, [], mar)
            continue
        started = time.monotonic()
        results[side] = run_side(
            server, example, root, mar, run / f"{side.split()[0]}-{built_by}", torch_home
        )
        print(
            f"  {side}: {'ok' if results[side].ok else 'FAIL'} in {time.monotonic() - started:.0f} s",
            flush=True,
        )
    theirs = results["torchserve"]
    for side in SIDES[1:]:
        mine = results[side]
        if not theirs.ok or len(mine.answers) != len(theirs.answers):
            mine.same = False
            continue
        diffs = [difference(a, b) for a, b in zip(mine.answers, theirs.answers, strict=True)]
        mine.differs = "; ".join(d for d in diffs if d)
        mine.same = not mine.differs
    return {
        "name": example.name,
        "handler": example.handler_kind,
        "note": example.note,
        "sides": {
            side: {
                "ok": r.ok,
                "same": r.ok if r.same is None else r.same,
                "differs": r.differs,
                "loaded": r.loaded,
                "error": r.error,
                "answers": [{"status": a.status, "body": a.short(300)} for a in r.answers],
            }
            for side, r in results.items()
        },
    }


def _cell(side: dict) -> str:
    if side["error"]:
        return f"✗ {side['error'][:80]}"
    statuses = ",".join(str(a["status"]) for a in side["answers"])
    if side["ok"] and not side["same"]:
        return "≠ " + statuses + f" ({side.get('differs', '')[:90]})"
    return ("✓ " if side["ok"] else "✗ ") + statuses


def table(rows: list[dict]) -> str:
    lines = ["| example | TorchServe | ours | ours, TorchServe's .mar | first answers (TorchServe / ours) |"]
    lines.append("|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | – | – | – | {row['error'][:100]} |")
            continue
        sides = row["sides"]
        first = [
            s["answers"][0]["body"][:60] if s["answers"] else "" for s in (sides[SIDES[0]], sides[SIDES[1]])
        ]
        cells = " | ".join(_cell(sides[s]) for s in SIDES)
        lines.append(f"| {row['name']} | {cells} | `{first[0]}` / `{first[1]}` |".replace("\n", " "))
    counted = [r for r in rows if "error" not in r]
    answered = [sum(r["sides"][s]["ok"] for r in counted) for s in SIDES]
    same = [sum(r["sides"][s]["ok"] and r["sides"][s]["same"] for r in counted) for s in SIDES]
    lines.append(f"| **answered, all 200** ({len(counted)} run) | {' | '.join(map(str, answered))} | |")
    lines.append(f"| **answered as TorchServe did** | {' | '.join(map(str, same))} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run examples whose name contains this")
    parser.add_argument(
        "--slow", action="store_true", help="also the examples that torch.compile densenet161"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/ts-examples"))
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "torchserve-examples.json")
    parser.add_argument("--table", type=Path, help="print the table of an earlier run's JSON and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if not (REPO / ".venv-ts" / "bin" / "torchserve").exists() or not shutil.which("java"):
        sys.exit("needs TorchServe 0.12 in .venv-ts (benchmarks/setup_torchserve.sh) and java")
    root = checkout(args.work)
    torch_home = args.work / "torch_home"
    hub_weights(torch_home)
    chosen = [
        e
        for e in EXAMPLES
        if (args.slow or not e.slow) and (not args.only or any(o in e.name for o in args.only))
    ]
    rows = []
    for example in chosen:
        print(f"{example.name}", flush=True)
        rows.append(run_example(example, root, args.work, torch_home))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
