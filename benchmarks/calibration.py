"""What the measured worker split costs and gives, and where each request's CPU goes (issue 25 items 2, 3).

    .venv/bin/python benchmarks/calibration.py                      # all four parts, 3 rounds
    .venv/bin/python benchmarks/calibration.py --baseline /tmp/base # parts 1 and 4 also against an older copy

1. Start-up of a model nobody sized and that has no example (the tiny Linear model, custom handler,
   no minWorkers): spawn to READY, this checkout against ``--baseline`` (a copy of archiver/ and
   handlers/ from before calibration), rounds taking turns.
2. A model with an example (a small conv net, v2 signature): its first start (it calibrates) against
   later starts (read back from the cache), and the split it chose.
3. Threads that follow the load, on that conv net: c=1 p50 and c=8 requests/s for 1 worker x all
   cores, N workers x 1 thread (pinned), and N workers whose threads follow the load (the default when
   calibration picks N: a lone batch gets the free cores, core_share.py), same client (hey), rounds
   taking turns; best of the rounds (noise only slows). c=1 p50 again while another program holds a
   core (a busy loop): where threads that ignored other programs took 121 ms against 9.9 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _common import REPO, free_port, stop_server, wait_ready_file
from serve import hey
from tiny import build_tiny

CONV_HANDLER = """
from handlers import BaseHandler


class Conv(BaseHandler):
    pass
"""

SIGNATURE = """batchSize: 8
maxBatchDelay: 5
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1, 3, 64, 64]}]
  outputs: [{name: output-0, datatype: FP32, shape: [-1, 10]}]
"""


def build_conv(out: Path) -> Path:
    """A small conv net (a few ms a forward pass on 2 cores) as TorchScript, served by BaseHandler."""
    import torch

    from archiver.build import build_archive

    work, store = out / "conv-work", out / "conv-store"
    for folder in (work, store):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    ).eval()
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 64, 64)), work / "conv.pt")
    (work / "conv_handler.py").write_text(CONV_HANDLER)
    (work / "conv-config.yaml").write_text(SIGNATURE)
    return Path(
        build_archive(
            model_name="conv",
            version="1.0",
            handler=str(work / "conv_handler.py"),
            serialized_file=str(work / "conv.pt"),
            config_file=str(work / "conv-config.yaml"),
            export_path=str(store),
        )
    )


def start(mar: Path, out: Path, label: str, extra: list[str], package: Path | None = None) -> tuple:
    """A server for ``mar`` (spawned, not yet ready) and its inference URL, ports and ready file."""
    ports = [free_port() for _ in range(3)]
    ready = out / f"cal-{label}-ready.json"
    ready.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if package is not None:
        env["PYTHONPATH"] = str(package)
    cmd = [
        str(REPO / ".venv" / "bin" / "python"),
        "-m",
        "archiver.cli",
        "serve",
        "--model-store",
        str(mar.parent),
    ]
    cmd += ["--models", f"{mar.stem}={mar.name}", "--ready-file", str(ready), *extra]
    cmd += ["--port", str(ports[0]), "--management-port", str(ports[1]), "--metrics-port", str(ports[2])]
    cmd += ["--cache-dir", str(out / "cal-cache")]
    if ((package or REPO) / "archiver" / "commands" / "grpc_ports.py").exists():
        cmd += ["--grpc-port", "off", "--grpc-management-port", "off"]  # fixed ports: one server at a time
    log = open(out / f"cal-{label}.log", "w")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
    proc.log_file = log  # type: ignore[attr-defined]
    return proc, ready, ports


def time_to_ready(mar: Path, out: Path, label: str, package: Path | None = None) -> tuple[float, dict]:
    started = time.perf_counter()
    proc, ready, ports = start(mar, out, label, [], package)
    try:
        wait_ready_file(ready, proc, 180)
        took = time.perf_counter() - started
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/models/{mar.stem}", timeout=10) as r:
            described = json.loads(r.read())[0]
        return took, described
    finally:
        stop_server(proc)
        proc.log_file.close()


def part_startup(args: argparse.Namespace, tiny: Path) -> None:
    copies = {"now": None, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    times: dict[str, list[float]] = {k: [] for k in copies}
    for _ in range(args.rounds):
        for label, package in copies.items():
            took, described = time_to_ready(tiny, args.out, f"tiny-{label}", package)
            times[label].append(took)
    print("\n1. start-up of the tiny model (no example), spawn to READY, seconds:")
    for label, values in times.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"   {label}: best {min(values):.2f}, median {statistics.median(values):.2f} ({shown})")
    if args.baseline:
        print(f"   now/baseline best: {min(times['now']) / min(times['baseline']):.2f}x")
    print(f"   the tiny model's split: {described.get('workerSplit')}")


def part_calibration(args: argparse.Namespace, conv: Path) -> None:
    shutil.rmtree(args.out / "cal-cache" / "calibration", ignore_errors=True)
    first, described = time_to_ready(conv, args.out, "conv-first")
    later = [time_to_ready(conv, args.out, f"conv-cached{n}")[0] for n in range(args.rounds)]
    print("\n2. the conv net (has an example), spawn to READY, seconds:")
    cached = ", ".join(f"{t:.2f}" for t in later)
    print(f"   first start (calibrates): {first:.2f}; later starts (cached): {cached}")
    print(f"   chosen: {described['workerSplit']}")


def part_threads(args: argparse.Namespace, conv: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    body = args.out / "conv-body.json"
    body.write_text(
        json.dumps(
            {
                "inputs": [
                    {"name": "x", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.5] * (3 * 64 * 64)}
                ]
            }
        )
    )
    shapes = {
        f"1x{cores}": ["--workers", "1"],
        f"{cores}x1 pinned": ["--workers", str(cores), "--torch-threads", "1"],
        f"{cores} following": ["--workers", str(cores)],
    }
    results: dict[str, list[dict]] = {k: [] for k in shapes}
    for number in range(args.rounds):
        for label, extra in shapes.items():
            proc, ready, ports = start(conv, args.out, label.replace(" ", "-"), extra)
            try:
                wait_ready_file(ready, proc, 180)
                url = f"http://127.0.0.1:{ports[0]}/v2/models/conv/infer"
                hey(url, 8, 2.0, body, "application/json")  # warm-up
                one = hey(url, 1, args.duration, body, "application/json")
                eight = hey(url, 8, args.duration, body, "application/json")
                with core_held():
                    time.sleep(1.5)  # the server's sampler (every 0.5 s) sees the other program first
                    held = hey(url, 1, args.duration, body, "application/json")
                results[label].append(
                    {
                        "c1_p50_ms": one["p50_ms"],
                        "c8_rps": eight["req_per_s"],
                        "c1_held_p50_ms": held["p50_ms"],
                        "errors": one["errors"] + eight["errors"] + held["errors"],
                    }
                )
                print(f"   round {number + 1} {label}: {results[label][-1]}", flush=True)
            finally:
                stop_server(proc)
                proc.log_file.close()
    print(f"\n3. threads that follow the load, conv net, {cores} cores, best of {args.rounds} rounds:")
    print("| split | c=1 p50 ms | c=8 req/s | c=1 p50 ms, a core held |\n|---|---|---|---|")
    for label, runs in results.items():
        p50 = min(r["c1_p50_ms"] for r in runs)
        rps = max(r["c8_rps"] for r in runs)
        held = min(r["c1_held_p50_ms"] for r in runs)
        print(f"| {label} | {p50:.2f} | {rps:.1f} | {held:.2f} |")


@contextlib.contextmanager
def core_held():
    """Another program holding one core (a busy loop) for the block."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def cpu(proc: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        times = proc.cpu_times()
        return times.user + times.system
    return 0.0


def loaded(url: str, body: Path, seconds: float, concurrency: int) -> tuple[dict, float]:
    """One hey run: its report's req/s and answers, and hey's own CPU seconds."""
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json"]
    proc = psutil.Popen([*cmd, "-D", str(body), url], stdout=subprocess.PIPE, text=True)
    used = 0.0
    while proc.poll() is None:
        used = max(used, cpu(proc))
        time.sleep(0.1)
    text = proc.stdout.read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    answered = sum(int(n) for n in re.findall(r"\[200\]\s+(\d+) responses", text))
    return {"req_per_s": rps, "answered": max(1, answered)}, used


def cpu_server(label: str, package: Path | None, mar: Path, args: argparse.Namespace) -> dict:
    extra = ["--workers", str(args.workers)]
    if args.torch_threads:
        extra += ["--torch-threads", str(args.torch_threads)]
    proc, ready, ports = start(mar, args.out, f"cpu-{label}", extra, package)
    url = f"http://127.0.0.1:{ports[0]}/predictions/{mar.stem}"
    with proc.log_file:
        try:
            wait_ready_file(ready, proc, 120)
            front = psutil.Process(proc.pid)
            loaded(url, args.body, args.warmup, args.concurrency)
            workers = front.children(recursive=True)
            before = (cpu(front), sum(cpu(w) for w in workers))
            run, client = loaded(url, args.body, args.duration, args.concurrency)
            after = (cpu(front), sum(cpu(w) for w in workers))
        finally:
            stop_server(proc)
    n = run["answered"]
    return {
        "req_per_s": run["req_per_s"],
        "front_us": (after[0] - before[0]) / n * 1e6,
        "workers_us": (after[1] - before[1]) / n * 1e6,
        "client_us": client / n * 1e6,
    }


def part_cpu(args: argparse.Namespace) -> None:
    """Where each request's CPU goes at c=32 on the tiny model (--workers 1 --torch-threads 1, as
    tiny.py): the client (hey), the front, the workers; this checkout against --baseline."""
    args.workers, args.torch_threads, args.concurrency, args.warmup = 1, 1, 32, 3.0
    mar = build_tiny(args.out, 32, 5)
    args.body = args.out / "tiny.json"
    args.body.write_text("[0.1, 0.2, 0.3, 0.4]")
    copies = {"now": None, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    rounds: dict[str, list[dict]] = {k: [] for k in copies}
    for number in range(args.rounds):
        for label, package in copies.items():
            got = cpu_server(label, package, mar, args)
            rounds[label].append(got)
            print(f"   round {number + 1} {label}: { {k: round(v, 1) for k, v in got.items()} }", flush=True)
    print(f"\n4. CPU per request, tiny model, c=32, best of {args.rounds} rounds (µs):")
    print("| server | req/s | front | workers | client (hey) |\n|---|---|---|---|---|")
    for label, runs in rounds.items():
        print(
            f"| {label} | {max(r['req_per_s'] for r in runs):,.0f} | {min(r['front_us'] for r in runs):.0f} "
            f"| {min(r['workers_us'] for r in runs):.0f} | {min(r['client_us'] for r in runs):.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out")
    parser.add_argument("--baseline", type=Path, help="a folder holding an older copy of archiver/")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run (comma-separated)")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("benchmarks/calibration.py needs hey: apt-get install -y hey")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    print(f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    if "1" in parts:
        tiny = build_tiny(args.out, 1, 5)
        part_startup(args, _without_min_workers(tiny, args.out))
    conv = build_conv(args.out) if parts & {"2", "3"} else None
    if "2" in parts:
        part_calibration(args, conv)
    if "3" in parts:
        part_threads(args, conv)
    if "4" in parts:
        part_cpu(args)
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


def _without_min_workers(mar: Path, out: Path) -> Path:
    """tiny.py's archive rebuilt without its model-config.yaml's minWorkers (nobody sizes it)."""
    from archiver.build import build_archive

    work, store = out / "tiny-work", out / "tiny-nosize-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    return Path(
        build_archive(
            model_name="tiny",
            version="1.0",
            handler=str(work / "tiny_handler.py"),
            serialized_file=str(work / "tiny.pt"),
            export_path=str(store),
        )
    )


if __name__ == "__main__":
    main()
