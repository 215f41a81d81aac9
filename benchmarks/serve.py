"""Serving benchmark, one command: our server vs the bare model vs TorchServe 0.12, same machine, one run.

    .venv/bin/python benchmarks/serve.py                # everything (TorchServe if .venv-ts and java exist)
    .venv/bin/python benchmarks/serve.py --duration 5 --rounds 1 --skip-torchserve

Two models, each archived once into a .mar both servers load (its model-config.yaml sets the batching):
ResNet34 with random weights (no weights can be downloaded; speed does not depend on them) behind a
TorchServe-style handler, fed the kitten photo; and a tiny model (Linear 4->2, JSON in and out) that
measures the server's own cost per request. Load comes from ``hey`` (apt-get install -y hey) at
concurrency 1, 8 and 32; every client call has a timeout, and every server is stopped in a ``finally``.

The bare model is the limit: decode + preprocess + forward in-process at the same batch size, in
each way the machine's cores can be split: one process with all cores' threads (``1x2`` on 2 cores)
and one single-threaded process per core (``2x1``), run side by side on a batch each, throughput
summed; at c=1 only one request is in flight, so ``2x1`` there is one single-threaded process. The
bare column keeps the best of the two for each measure. Our server runs in the same two shapes
(``--workers P --torch-threads T``) and its column keeps the best too; both shapes are shown.
Memory is the peak PSS (``/proc/PID/smaps_rollup``: shared pages charged once, in parts) of every
process: our front and workers, TorchServe's Java frontend and Python workers, the bare processes.
Prints tables with ratios and the targets, and writes bench-out/serve.json. Everything runs --rounds
times (default 2) and keeps the best figure of each measure: on a shared machine noise only slows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import _torchserve
import psutil
from _bare import run_bare
from _common import (
    KITTEN,
    REPO,
    MemorySampler,
    free_port,
    our_child_role,
    stop_server,
    tree_roles,
    wait_ready_file,
)
from _models import build_models
from _serve_report import (
    CONCURRENCY,
    merge_rounds,
    report,
    report_memory,
    report_shapes,
    report_targets,
    spread,
)


def post_ok(url: str, body: bytes, content_type: str, timeout: float = 10) -> bool:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_first_prediction(
    url: str,
    body: bytes,
    content_type: str,
    started: float,
    limit_s: float = 180,
    proc: subprocess.Popen | None = None,
) -> float:
    """Seconds from ``started`` to the first 200; fails at once if ``proc`` (the server) has exited."""
    deadline = started + limit_s
    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before answering {url}")
        if post_ok(url, body, content_type, timeout=5):
            return time.perf_counter() - started
        time.sleep(0.05)
    raise RuntimeError(f"no successful prediction from {url} within {limit_s:.0f} s")


def hey(url: str, concurrency: int, duration_s: float, body_file: Path, content_type: str) -> dict:
    """One load run; throughput and latency percentiles from hey's report."""
    cmd = ["hey", "-z", f"{duration_s}s", "-c", str(concurrency), "-m", "POST", "-t", "20"]
    cmd += ["-T", content_type, "-D", str(body_file), url]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    pct = {int(p): float(s) * 1000 for p, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", text)}
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", text)}
    errors = sum(n for c, n in codes.items() if c != 200) + len(re.findall(r"Error distribution", text))
    return {"req_per_s": rps, "p50_ms": pct.get(50), "p99_ms": pct.get(99), "codes": codes, "errors": errors}


def load_runs(
    url: str,
    duration: float,
    body_file: Path,
    ctype: str,
    roles,
    concurrency: tuple[int, ...] = CONCURRENCY,
    warmup_s: float = 3.0,
    memory: bool = True,
) -> dict:
    """Warm-up, the timed runs at each concurrency, then memory under c=32 load in a run of its own
    (reading a torch process's memory maps costs CPU, which the timed runs must not pay)."""
    hey(url, max(concurrency), warmup_s, body_file, ctype)  # allocator, Java's JIT, torch's profiling
    runs = {f"c{c}": hey(url, c, duration, body_file, ctype) for c in concurrency}
    if not memory:
        return runs
    with MemorySampler(roles) as mem:
        hey(url, 32, min(5.0, duration), body_file, ctype)
    return {**runs, "memory": mem.result()}


def chosen(log_path: str, name: str) -> str:
    """What our server says it chose for a model (its start-up line 'model "NAME": ...'), for the report."""
    with open(log_path, errors="replace") as stream:
        for line in stream:
            if line.startswith(f'model "{name}": '):
                return line.split(": ", 1)[1].strip()
    return "?"


def shape_label(shape: tuple[int, int] | None) -> str:
    return "default" if shape is None else f"{shape[0]}x{shape[1]}"


def shapes(cores: int) -> dict[str, tuple[int, int]]:
    """The ways to fill the cores: 'PxT' -> (processes, torch threads each)."""
    pairs = {(1, cores), (cores, 1)}
    return {f"{p}x{t}": (p, t) for p, t in sorted(pairs)}


# ---- the servers --------------------------------------------------------------------------------
def run_ours(
    name: str,
    mar: Path,
    shape: tuple[int, int] | None,
    duration: float,
    body_file: Path,
    ctype: str,
    out: Path,
    **load: object,
) -> dict:
    """Our server on ``mar``: ``shape`` (workers, torch threads) as flags, or None for its defaults;
    ``load`` goes to load_runs (concurrency, warm-up, memory)."""
    ports = [free_port() for _ in range(5)]
    ready_file = out / f"ours-{name}-ready.json"
    ready_file.unlink(missing_ok=True)
    cmd = [str(REPO / ".venv" / "bin" / "model-archiver"), "serve", "--model-store", str(mar.parent)]
    cmd += ["--models", f"{name}={mar.name}", "--port", str(ports[0]), "--management-port", str(ports[1])]
    cmd += [
        "--metrics-port",
        str(ports[2]),
        "--grpc-port",
        str(ports[3]),
        "--grpc-management-port",
        str(ports[4]),
        "--cache-dir",
        str(out / "cache"),
        "--ready-file",
        str(ready_file),
    ]
    if shape is not None:
        cmd += ["--workers", str(shape[0]), "--torch-threads", str(shape[1])]
    url = f"http://127.0.0.1:{ports[0]}/predictions/{name}"
    log = open(out / f"ours-{name}-{shape_label(shape)}.log", "w")  # noqa: SIM115 - closed in finally
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        startup = wait_first_prediction(url, body_file.read_bytes(), ctype, started, proc=proc)
        ready = wait_ready_file(ready_file, proc, 30)
        if shape is not None and len(ready["workers"].get(name, [])) != shape[0]:
            raise RuntimeError(f"asked for {shape[0]} workers, READY says {ready['workers']}")
        roles = tree_roles(psutil.Process(proc.pid), "front", our_child_role)
        runs = load_runs(url, duration, body_file, ctype, roles, **load)
        return {
            "startup_s": startup,
            "ready_workers": ready["workers"],
            "chosen": chosen(log.name, name),
            **runs,
        }
    finally:
        stop_server(proc)
        log.close()


def run_torchserve(
    setup: _torchserve.Setup,
    name: str,
    mar: Path,
    duration: float,
    body_file: Path,
    ctype: str,
    out: Path,
    batch: int,
    delay_ms: int,
    **load: object,
) -> dict:
    """TorchServe in one of its setups (benchmarks/_torchserve.py) on ``mar``, loaded like ours."""
    home = (out / f"ts-{setup.label}-{name}").resolve()
    started = time.perf_counter()
    with _torchserve.started(setup, mar, home, batch, delay_ms) as ts:
        startup = wait_first_prediction(ts.url, body_file.read_bytes(), ctype, started)
        roles = tree_roles(ts.java, "frontend (java)", _torchserve.worker_role)
        runs = load_runs(ts.url, duration, body_file, ctype, roles, **load)
        return {"startup_s": startup, "description": ts.description, **runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out")
    parser.add_argument("--resnet-batch", type=int, default=8)
    parser.add_argument("--tiny-batch", type=int, default=32)
    parser.add_argument("--max-batch-delay", type=int, default=5, help="ms, for both servers")
    parser.add_argument("--skip-torchserve", action="store_true")
    parser.add_argument(
        "--rounds", type=int, default=2, help="repeat everything; the table keeps each measure's best round"
    )
    parser.add_argument(
        "--shapes", help="processes x threads of the bare model, comma-separated (default: 1xCORES,CORESx1)"
    )
    parser.add_argument(
        "--ours-shapes",
        help="our server's shapes, comma-separated; 'default' runs it with no --workers/--torch-threads "
        "(default: default and every --shapes)",
    )
    parser.add_argument(
        "--ts-setups",
        default="best,2workers",
        help=f"TorchServe setups, comma-separated, from {sorted(_torchserve.SETUPS)} (see _torchserve.py)",
    )
    parser.add_argument("--models", default="resnet34,tiny", help="comma-separated: resnet34, tiny")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before ResNet34's runs")
    parser.add_argument(
        "--tiny-warmup", type=float, default=20.0, help="seconds before the tiny model's (Java's JIT)"
    )
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("benchmarks/serve.py needs hey: apt-get install -y hey")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    all_shapes = shapes(cores)
    if args.shapes:
        all_shapes = {s: tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")}
    ours_shapes = {"default": None, **all_shapes}
    if args.ours_shapes:
        ours_shapes = {
            s: None if s == "default" else tuple(int(x) for x in s.split("x"))
            for s in args.ours_shapes.split(",")
        }
    names = args.models.split(",")
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    load_before = os.getloadavg()
    mars = build_models(args.out, args.resnet_batch, args.tiny_batch, args.max_batch_delay)
    mars = {name: Path(mars[name]) for name in names}
    tiny_body = args.out / "tiny.json"
    tiny_body.write_text(json.dumps([0.1, 0.2, 0.3, 0.4]))
    inputs = {"resnet34": (KITTEN, "image/jpeg"), "tiny": (tiny_body, "application/json")}
    batches = {"resnet34": args.resnet_batch, "tiny": args.tiny_batch}

    def load(name: str) -> dict:
        warm = args.tiny_warmup if name == "tiny" else args.warmup
        return {"concurrency": concurrency, "warmup_s": warm, "memory": not args.no_memory}

    results: dict = {
        "machine": {"cpus": cores, "python": platform.python_version(), "load_before": load_before}
    }
    results["settings"] = vars(args) | {"out": str(args.out), "shapes": list(all_shapes)}
    print(
        f"machine: {cores} cpus, load average before {load_before[0]:.2f}; shapes {list(all_shapes)}",
        flush=True,
    )
    setups = []
    if _torchserve.available() and not args.skip_torchserve:
        setups = [_torchserve.SETUPS[s] for s in args.ts_setups.split(",") if s]
    else:
        print("TorchServe skipped (run benchmarks/setup_torchserve.sh to compare)", flush=True)
    configs = {
        "bare PxT": "P processes x T torch threads: decode, preprocess, forward, top-1 in-process; no server",
        "ours default": "model-archiver serve with no --workers/--torch-threads (its own defaults)",
        "ours PxT": "model-archiver serve --workers P --torch-threads T",
        **{
            s.label: s.describe(batches.get(names[0], 0), args.max_batch_delay).split(": ", 1)[1]
            for s in setups
        },
    }
    rounds: list[dict] = []
    for number in range(1, args.rounds + 1):
        # All runs take turns within each round, so a busy spell hits all of them alike; the order of
        # the sides reverses every other round.
        one: dict = {"bare_shapes": {}, "ours_shapes": {}, "ts_setups": {}}

        def bare(number: int, one: dict) -> None:
            if "resnet34" not in names:
                return
            for shape, (procs, threads) in all_shapes.items():
                tiny_batch = args.tiny_batch if "tiny" in names else None
                one["bare_shapes"][shape] = run_bare(
                    args.out / "work",
                    procs,
                    threads,
                    args.duration,
                    args.resnet_batch,
                    tiny_batch,
                    not args.no_memory,
                )
                print(f"round {number} bare {shape}:", json.dumps(one["bare_shapes"][shape]), flush=True)

        def ours(number: int, one: dict) -> None:
            for shape, pair in ours_shapes.items():
                one["ours_shapes"][shape] = {}
                for name, mar in mars.items():
                    got = run_ours(name, mar, pair, args.duration, *inputs[name], args.out, **load(name))
                    one["ours_shapes"][shape][name] = got
                    print(f"round {number} ours {shape} {name}:", json.dumps(got), flush=True)

        def torchserve(number: int, one: dict) -> None:
            for setup in setups:
                one["ts_setups"][setup.label] = {}
                for name, mar in mars.items():
                    got = run_torchserve(
                        setup,
                        name,
                        mar,
                        args.duration,
                        *inputs[name],
                        args.out,
                        batches[name],
                        args.max_batch_delay,
                        **load(name),
                    )
                    one["ts_setups"][setup.label][name] = got
                    print(f"round {number} {setup.label} {name}:", json.dumps(got), flush=True)

        sides = [bare, ours, torchserve]
        for side in sides if number % 2 else reversed(sides):
            side(number, one)
        if setups:
            one["torchserve"] = merge_rounds(list(one["ts_setups"].values()))
        rounds.append(one)
    results |= merge_rounds(rounds)
    results["bare"] = merge_rounds(list(results["bare_shapes"].values())) if results["bare_shapes"] else {}
    results["ours"] = merge_rounds(list(results["ours_shapes"].values()))
    results["rounds"] = rounds
    for name in names:
        if "default" in ours_shapes:
            picked = {r["ours_shapes"]["default"][name].get("chosen") for r in rounds}
            configs[f"ours default, {name}"] = "; ".join(sorted(str(p) for p in picked))
    results["configs"] = configs
    results["machine"]["load_after"] = os.getloadavg()
    sections = [
        "Configurations:\n" + "\n".join(f"- {k}: {v}" for k, v in configs.items()),
        spread(rounds, names),
        report(results),
        report_shapes(results),
    ]
    if not args.no_memory:
        sections.append(report_memory(results))
    if "resnet34" in names:
        sections.append(report_targets(results))
    text = "\n\n".join(sections)
    (args.out / "serve.json").write_text(json.dumps(results, indent=2))
    (args.out / "serve.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nload average before {load_before[0]:.2f}, after {results['machine']['load_after'][0]:.2f}")


if __name__ == "__main__":
    main()
