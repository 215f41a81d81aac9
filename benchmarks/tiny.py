"""The server's own cost per request: the tiny model (Linear 4->2, JSON in and out) at c=32 and c=1,
ours against TorchServe 0.12 (and, with --baseline, against another copy of this package), one run.

    .venv/bin/python benchmarks/tiny.py                          # ours vs TorchServe, 2 rounds
    .venv/bin/python benchmarks/tiny.py --baseline /tmp/base     # also a copy of an older commit:
        git archive HEAD archiver handlers | tar -x -C /tmp/base   (made by you beforehand)

``--baseline`` may be given several times, as ``LABEL=DIR`` (or just ``DIR``, labelled "baseline"),
to compare the steps of a change in one run. The part of ``serve.py`` that issue 15's request-path
target is about, in about a minute instead of
twelve. Every server is started fresh in each round, warmed up, loaded by ``hey`` at each concurrency
and stopped in a ``finally``; the servers take turns within a round so a busy spell on a shared machine
hits them alike, and the table keeps each measure's best round (noise only slows). It prints ratios,
which hold on a busy machine far better than absolute figures do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _common import REPO, free_port, stop_server, wait_ready_file
from serve import TINY_HANDLER, TS_VENV, _find_torchserve, hey, started_torchserve, wait_first_prediction


def build_tiny(out: Path, batch: int, delay_ms: int) -> Path:
    """The tiny model's .mar, built by our archiver (both servers load the same file)."""
    import torch

    from archiver.build import build_archive

    work, store = out / "tiny-work", out / "tiny-store"
    for folder in (work, store):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    torch.manual_seed(0)
    tiny = torch.nn.Linear(4, 2).eval()
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(tiny, torch.rand(1, 4)), work / "tiny.pt")
    (work / "tiny_handler.py").write_text(TINY_HANDLER)
    config = work / "tiny-config.yaml"
    config.write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch}\nmaxBatchDelay: {delay_ms}\n")
    return Path(
        build_archive(
            model_name="tiny",
            version="1.0",
            handler=str(work / "tiny_handler.py"),
            serialized_file=str(work / "tiny.pt"),
            config_file=str(config),
            export_path=str(store),
        )
    )


def cpu_seconds(procs: list[psutil.Process]) -> dict[str, float]:
    """CPU time (user + system) each role has used so far: the front, and all workers summed."""
    used = {"front": 0.0, "workers": 0.0}
    for i, proc in enumerate(procs):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            used["front" if i == 0 else "workers"] += times.user + times.system
    return used


def measure(url: str, body_file: Path, args: argparse.Namespace, root: psutil.Process) -> dict:
    """Each concurrency's hey run, with the CPU time the server's processes spent per request: on a
    shared machine req/s follows whatever else runs, CPU per request far less."""
    # Warm-up at the highest concurrency: Java's JIT in TorchServe's frontend needs a few seconds of it.
    hey(url, max(args.concurrency), args.warmup, body_file, "application/json")
    procs = [root, *root.children(recursive=True)]
    runs = {}
    for c in args.concurrency:
        before = cpu_seconds(procs)
        run = hey(url, c, args.duration, body_file, "application/json")
        after = cpu_seconds(procs)
        answered = max(1, sum(run["codes"].values()))
        for role in before:
            run[f"{role}_cpu_us"] = (after[role] - before[role]) / answered * 1e6
        runs[f"c{c}"] = run
    return runs


def run_ours(
    label: str, package_root: Path | None, mar: Path, args: argparse.Namespace, loop: str = ""
) -> dict:
    """Our server from this checkout, or (``package_root``) from another copy of the package; ``loop``
    "asyncio" makes it run on asyncio's own event loop instead of uvloop."""
    ports = [free_port() for _ in range(3)]
    ready_file = args.out / f"tiny-{label}-ready.json"
    ready_file.unlink(missing_ok=True)
    env = dict(os.environ)
    if package_root is not None:
        env["PYTHONPATH"] = str(package_root)  # ahead of the editable install's finder
    if loop:
        env["MODEL_ARCHIVER_EVENT_LOOP"] = loop
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "archiver.cli", "serve"]
    cmd += ["--model-store", str(mar.parent), "--models", f"tiny={mar.name}"]
    cmd += ["--port", str(ports[0]), "--management-port", str(ports[1]), "--metrics-port", str(ports[2])]
    cmd += ["--cache-dir", str(args.out / "tiny-cache"), "--ready-file", str(ready_file)]
    cmd += ["--workers", str(args.workers), "--torch-threads", "1"]
    url = f"http://127.0.0.1:{ports[0]}/predictions/tiny"
    body_file = args.out / "tiny.json"
    with open(args.out / f"tiny-{label}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.out)
        try:
            wait_first_prediction(url, body_file.read_bytes(), "application/json", time.perf_counter())
            wait_ready_file(ready_file, proc, 30)
            return measure(url, body_file, args, psutil.Process(proc.pid))
        finally:
            stop_server(proc)


def run_torchserve(mar: Path, args: argparse.Namespace) -> dict:
    home = (args.out / "tiny-ts").resolve()
    with started_torchserve("tiny", mar, home) as url:
        body_file = args.out / "tiny.json"
        wait_first_prediction(url, body_file.read_bytes(), "application/json", time.perf_counter())
        java = _find_torchserve(home)
        if java is None:
            raise RuntimeError("TorchServe answers but its Java process was not found")
        return measure(url, body_file, args, java)


def best(rounds: list[dict], server: str, c: int, key: str) -> float | None:
    values = [r[server][f"c{c}"].get(key) for r in rounds if server in r]
    values = [v for v in values if v is not None]
    if not values:
        return None
    return max(values) if key == "req_per_s" else min(values)


def table(rounds: list[dict], servers: list[str], concurrency: list[int]) -> str:
    reference = "torchserve" if "torchserve" in servers else None
    rows = ["| measure | " + " | ".join(servers) + (" | ours/TorchServe |" if reference else " |")]
    rows.append("|---" * (len(servers) + 1 + bool(reference)) + "|")
    for c in concurrency:
        for key, unit in (
            ("req_per_s", "req/s"),
            ("p50_ms", "ms p50"),
            ("p99_ms", "ms p99"),
            ("front_cpu_us", "front CPU µs/request"),
            ("workers_cpu_us", "workers' CPU µs/request"),
        ):
            values = [best(rounds, s, c, key) for s in servers]
            cells = [f"{v:,.1f}" if v is not None else "-" for v in values]
            ratio = ""
            if reference:
                ours, ts = best(rounds, "ours", c, key), best(rounds, reference, c, key)
                ratio = f" {ours / ts:.2f}x |" if ours and ts else " - |"
            rows.append(f"| c={c} {unit} | " + " | ".join(cells) + " |" + ratio)
    return "\n".join(rows)


def _copy(spec: str) -> tuple[str, Path]:
    label, sep, folder = spec.rpartition("=")
    path = Path(folder).resolve()
    if not (path / "archiver" / "__init__.py").is_file():
        sys.exit(f"--baseline {spec}: {path} holds no archiver/ package")
    return (label if sep else "baseline"), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-batch-delay", type=int, default=5, help="ms, for both servers")
    parser.add_argument("--workers", type=int, default=1, help="our worker processes")
    parser.add_argument("--concurrency", default="32,1", help="comma-separated")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="[LABEL=]DIR",
        help="a folder holding another copy of archiver/ (repeatable)",
    )
    parser.add_argument("--skip-torchserve", action="store_true")
    parser.add_argument(
        "--with-asyncio", action="store_true", help="also run ours on asyncio's event loop (not uvloop)"
    )
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("benchmarks/tiny.py needs hey: apt-get install -y hey")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    mar = build_tiny(args.out, args.batch, args.max_batch_delay)
    (args.out / "tiny.json").write_text(json.dumps([0.1, 0.2, 0.3, 0.4]))
    have_ts = (TS_VENV / "bin" / "torchserve").exists() and shutil.which("java") and not args.skip_torchserve
    copies = dict(_copy(spec) for spec in args.baseline)
    servers = ["ours", *(["ours-asyncio"] if args.with_asyncio else []), *copies]
    servers += ["torchserve"] if have_ts else []
    print(f"load average before {os.getloadavg()[0]:.2f}; servers {servers}", flush=True)
    rounds = []
    for number in range(1, args.rounds + 1):
        one = {}
        for server in servers:
            if server == "torchserve":
                one[server] = run_torchserve(mar, args)
            else:
                loop = "asyncio" if server == "ours-asyncio" else ""
                one[server] = run_ours(server, copies.get(server), mar, args, loop)
            summary = {
                c: (r["req_per_s"], r["p50_ms"], round(r["front_cpu_us"]), r["errors"])
                for c, r in one[server].items()
            }
            print(f"round {number} {server}: {summary}", flush=True)
        rounds.append(one)
    text = table(rounds, servers, args.concurrency)
    (args.out / "tiny.json.out").write_text(json.dumps(rounds, indent=2))
    print()
    print(text)
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
