"""The server's own cost per request: the tiny model (Linear 4->2, JSON in and out) at c=32 and c=1,
ours against TorchServe 0.12 at its best (and, with --baseline, against another copy of this package).

    .venv/bin/python benchmarks/tiny.py                          # ours vs TorchServe, about 3 minutes
    .venv/bin/python benchmarks/tiny.py --ts-setups best,netty1  # several TorchServe setups, best kept
    .venv/bin/python benchmarks/tiny.py --baseline /tmp/base     # also a copy of an older commit:
        git archive HEAD archiver handlers | tar -x -C /tmp/base   (made by you beforehand)

``--baseline`` may be given several times, as ``LABEL=DIR`` (or just ``DIR``, labelled "baseline"),
to compare the steps of a change in one run.

Every server is started once and loaded by ``hey`` for ``--warmup`` seconds (TorchServe's Java front
end gets faster for 20-30 s of load while its JIT compiles; ours has no JIT but is warmed the same).
Then ``--rounds`` rounds: in each, every server in turn takes ``--duration`` seconds at each
concurrency, the order reversed every other round so that a busy spell on a shared machine hits them
alike. TorchServe runs as ``_torchserve.py`` describes (registered through its management API with
the batch settings, no per-request log lines, async logging): the documented configuration for
throughput. The report gives every round's figure, the best and the median, ratios both ways, each
server's configuration, and the CPU time each server's processes spent per request. Every server is
stopped in a ``finally``.
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
from collections.abc import Iterator
from pathlib import Path

import _torchserve
import psutil
from _common import REPO, free_port, stop_server, wait_ready_file
from _models import TINY_HANDLER
from _spread import best, ratio_lines, spread_table
from serve import chosen, hey, wait_first_prediction


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


def measure_once(url: str, body_file: Path, c: int, duration: float, root: psutil.Process) -> dict:
    """One hey run, with the CPU time the server's processes spent per request: on a shared machine
    req/s follows whatever else runs, CPU per request far less."""
    procs = [root, *root.children(recursive=True)]
    before = cpu_seconds(procs)
    run = hey(url, c, duration, body_file, "application/json")
    after = cpu_seconds(procs)
    answered = max(1, sum(run["codes"].values()))
    for role in before:
        run[f"{role}_cpu_us"] = (after[role] - before[role]) / answered * 1e6
    return run


def has_grpc_flags(package_root: Path | None) -> bool:
    """Whether this copy of the package has --grpc-port (older commits have no gRPC server)."""
    if package_root is None:
        return True
    return any(
        '"--grpc-port"' in f.read_text(errors="replace") for f in (package_root / "archiver").rglob("*.py")
    )


@contextlib.contextmanager
def ours(
    label: str, package_root: Path | None, mar: Path, args: argparse.Namespace, loop: str = ""
) -> Iterator[dict]:
    """Our server from this checkout, or (``package_root``) from another copy of the package; ``loop``
    "asyncio" makes it run on asyncio's own event loop instead of uvloop. Its own defaults unless
    --ours-args says otherwise."""
    ports = [free_port() for _ in range(5)]
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
    if has_grpc_flags(package_root):
        cmd += ["--grpc-port", str(ports[3]), "--grpc-management-port", str(ports[4])]
    cmd += ["--cache-dir", str(args.out / "tiny-cache"), "--ready-file", str(ready_file)]
    if package_root is None:  # an older copy may not know these flags
        cmd += args.ours_args.split()
    url = f"http://127.0.0.1:{ports[0]}/predictions/tiny"
    body_file = args.out / "tiny.json"
    with open(args.out / f"tiny-{label}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.out)
        try:
            wait_first_prediction(
                url, body_file.read_bytes(), "application/json", time.perf_counter(), proc=proc
            )
            wait_ready_file(ready_file, proc, 30)
            flags = args.ours_args or "defaults"
            description = (
                f"{label}: model-archiver serve ({flags}; the archive's batchSize {args.batch}, "
                f"maxBatchDelay {args.max_batch_delay} ms), {chosen(log.name, 'tiny')}"
                + (f", {loop} event loop" if loop else "")
                + (f", package from {package_root}" if package_root else "")
            )
            yield {"url": url, "root": psutil.Process(proc.pid), "description": description}
        finally:
            stop_server(proc)


@contextlib.contextmanager
def torchserve(setup: _torchserve.Setup, mar: Path, args: argparse.Namespace) -> Iterator[dict]:
    home = (args.out / f"tiny-{setup.label}").resolve()
    with _torchserve.started(setup, mar, home, args.batch, args.max_batch_delay) as ts:
        wait_first_prediction(
            ts.url, (args.out / "tiny.json").read_bytes(), "application/json", time.perf_counter()
        )
        yield {"url": ts.url, "root": ts.java, "description": ts.description}


def _copy(spec: str) -> tuple[str, Path]:
    label, sep, folder = spec.rpartition("=")
    path = Path(folder).resolve()
    if not (path / "archiver" / "__init__.py").is_file():
        sys.exit(f"--baseline {spec}: {path} holds no archiver/ package")
    return (label if sep else "baseline"), path


def report(rounds: list[dict], servers: dict[str, dict], concurrency: list[int]) -> str:
    peers = [s for s in servers if s.startswith("torchserve")]
    others = [s for s in servers if s != "ours"]
    parts = ["Configurations:", *(f"- {s['description']}" for s in servers.values()), ""]
    for c in concurrency:
        for key, unit, higher in (("req_per_s", "req/s", True), ("p50_ms", "ms p50", False)):
            series = {s: [r[s][f"c{c}"].get(key) for r in rounds] for s in servers}
            parts.append(spread_table(f"c={c}", unit, series, higher))
            parts += ratio_lines(f"c={c} {unit}", "ours", series, higher, others)
            parts.append("")
        for key, unit in (
            ("front_cpu_us", "front CPU µs/request"),
            ("workers_cpu_us", "workers' CPU µs/request"),
        ):
            series = {s: [r[s][f"c{c}"].get(key) for r in rounds] for s in servers}
            parts.append(spread_table(f"c={c}", unit, series, higher=False))
            parts.append("")
    if peers:
        best_peer = {
            c: max(peers, key=lambda p: best([r[p][f"c{c}"]["req_per_s"] for r in rounds], True) or 0)
            for c in concurrency
        }
        parts.append(f"TorchServe's best setup per concurrency: {best_peer}")
        for c in concurrency[:1]:  # issue 25's target: the first (highest) concurrency
            series = {s: [r[s][f"c{c}"]["req_per_s"] for r in rounds] for s in ("ours", best_peer[c])}
            parts += ratio_lines(
                f"TARGET c={c} req/s vs TorchServe at its best", "ours", series, True, [best_peer[c]]
            )
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warmup", type=float, default=25.0, help="seconds of c=32 load on each server first"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-out")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-batch-delay", type=int, default=5, help="ms, for both servers")
    parser.add_argument(
        "--ours-args",
        default="",
        help="extra flags for our server from this checkout (default: none, its defaults)",
    )
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
        "--ts-setups",
        default="best",
        help=f"TorchServe setups to run, comma-separated, from {sorted(_torchserve.SETUPS)}",
    )
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
    body_file = args.out / "tiny.json"
    body_file.write_text(json.dumps([0.1, 0.2, 0.3, 0.4]))
    setups = (
        []
        if args.skip_torchserve or not _torchserve.available()
        else [_torchserve.SETUPS[s] for s in args.ts_setups.split(",")]
    )
    copies = dict(_copy(spec) for spec in args.baseline)
    print(f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        servers = {"ours": stack.enter_context(ours("ours", None, mar, args))}
        if args.with_asyncio:
            servers["ours-asyncio"] = stack.enter_context(ours("ours-asyncio", None, mar, args, "asyncio"))
        for label, root in copies.items():
            servers[label] = stack.enter_context(ours(label, root, mar, args))
        for setup in setups:
            servers[setup.label] = stack.enter_context(torchserve(setup, mar, args))
        for label, server in servers.items():
            warm = hey(server["url"], max(args.concurrency), args.warmup, body_file, "application/json")
            print(f"warm-up {label}: {warm['req_per_s']:,.0f} req/s over {args.warmup:.0f} s", flush=True)
        rounds = []
        for number in range(1, args.rounds + 1):
            order = list(servers) if number % 2 else list(reversed(servers))
            one = {label: {} for label in servers}
            for label in order:
                for c in args.concurrency:
                    one[label][f"c{c}"] = measure_once(
                        servers[label]["url"], body_file, c, args.duration, servers[label]["root"]
                    )
                summary = {
                    c: (round(r["req_per_s"]), r["p50_ms"], r["errors"]) for c, r in one[label].items()
                }
                print(f"round {number} {label}: {summary}", flush=True)
            rounds.append(one)
    text = report(rounds, servers, args.concurrency)
    (args.out / "tiny.json.out").write_text(
        json.dumps({"rounds": rounds, "servers": {k: v["description"] for k, v in servers.items()}}, indent=2)
    )
    print()
    print(text)
    print(f"\nload average after {os.getloadavg()[0]:.2f}; {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
