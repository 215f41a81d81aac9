"""Ray Serve against the bundled server, one command, one run: ResNet34 on 2 Ray replicas vs 2 workers.

    .venv/bin/python benchmarks/cluster.py                    # 10 s load runs, 2 rounds
    .venv/bin/python benchmarks/cluster.py --duration 5 --rounds 1

The same .mar (ResNet34, random weights, a TorchServe-style handler, batch 8, 5 ms delay: serve.py's
model) is served twice, taking turns within each round:

- ours: ``model-archiver serve`` with 2 worker processes of 1 torch thread each;
- Ray: ``serve run`` of the config ``model-archiver deploy ray --replicas 2`` writes (a local Ray of
  its own, 2 replicas of 1 CPU each; a replica runs one torch thread per CPU it holds, so 1 each; the
  proxy and the controller take the remaining cycles like our front does).

Measured for each: time to first answer (from starting the command to the first 200 on a kitten),
throughput and latency from ``hey`` at c=1, 8 and 32 (serve.py's load_runs, warm-up included), and
peak memory under c=32 load summed over every process the server started (PSS, so shared pages are
charged once). Prints the figures and the Ray/ours ratios; writes bench-out/cluster.json. Each
measure keeps its best round (noise on a shared machine only slows). Ray's processes carry a marker
in their environment; exactly those are ended at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import yaml
from _common import KITTEN, REPO, free_port
from _models import build_models
from _serve_report import merge_rounds
from serve import load_runs, run_ours, wait_first_prediction

BIN = REPO / ".venv" / "bin"
MARK = "ARCHIVER_CLUSTER_BENCH"


def marked(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARK) == mark:
                found.append(proc)
    return found


def ray_config(mar: Path, out: Path, replicas: int, port: int) -> Path:
    """What ``model-archiver deploy ray`` writes, with the HTTP proxy on a free loopback port."""
    path = out / "ray-serve-config.yaml"
    command = [str(BIN / "model-archiver"), "deploy", "ray", str(mar), "--replicas", str(replicas)]
    command += ["--port", str(port), "-o", str(path), "-f"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    config = yaml.safe_load(path.read_text())
    config["proxy_location"] = "HeadOnly"  # one machine: one proxy
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_ray(name: str, mar: Path, replicas: int, duration: float, out: Path) -> dict:
    port = free_port()
    config = ray_config(mar, out, replicas, port)
    mark = uuid.uuid4().hex
    env = {
        **os.environ,
        MARK: mark,
        "MODEL_ARCHIVER_CACHE": str(out / "cache"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    url = f"http://127.0.0.1:{port}/predictions/{name}"
    log = open(out / "ray-serve-run.log", "w")  # noqa: SIM115 - closed in finally
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out
    )
    try:
        startup = wait_first_prediction(url, KITTEN.read_bytes(), "image/jpeg", started, limit_s=300)
        # Named once: a Ray worker's title changes with the method it runs.
        named = []
        for p in marked(mark):
            with contextlib.suppress(psutil.Error):
                named.append((f"{' '.join(p.cmdline())[:60] or p.name()} [{p.pid}]", p.pid))

        def roles() -> list[tuple[str, int]]:
            return named

        runs = load_runs(url, duration, KITTEN, "image/jpeg", roles)
        return {"startup_s": startup, "processes": len(named), **runs}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does: serve run shuts its Ray down
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        left = marked(mark)
        _, alive = psutil.wait_procs(left, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(best: dict) -> str:
    ours, ray = best["ours"], best["ray"]
    rows = [("time to first answer (s)", ours["startup_s"], ray["startup_s"])]
    for c in ("c1", "c8", "c32"):
        rows.append((f"{c} req/s", ours[c]["req_per_s"], ray[c]["req_per_s"]))
        rows.append((f"{c} p50 ms", ours[c]["p50_ms"], ray[c]["p50_ms"]))
    rows.append(("PSS sum under c=32 (MB)", ours["memory"]["pss_total_mb"], ray["memory"]["pss_total_mb"]))
    lines = [
        "| measure | bundled server (2 workers x 1 thread) | Ray Serve (2 replicas x 1 CPU) | Ray / ours |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, a, b in rows:
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {_ratio(b, a)} |")
    lines.append(f"\nRay processes: {ray['processes']} (every one counted in its PSS sum)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "cluster")
    args = parser.parse_args()
    if not (BIN / "serve").exists():
        sys.exit("benchmarks/cluster.py needs Ray Serve: pip install 'torchmar[ray]'")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    mar = build_models(args.out, 8, 32, 5)["resnet34"]
    rounds = []
    for number in range(1, args.rounds + 1):
        one = {
            "ours": run_ours("resnet34", mar, (2, 1), args.duration, KITTEN, "image/jpeg", args.out),
            "ray": run_ray("resnet34", mar, 2, args.duration, args.out),
        }
        print(f"round {number}:", json.dumps(one), flush=True)
        rounds.append(one)
    best = merge_rounds(rounds)
    text = report(best)
    load_after = os.getloadavg()
    results = {"best": best, "rounds": rounds, "load_before": load_before, "load_after": load_after}
    (args.out / "cluster.json").write_text(json.dumps(results, indent=2))
    print()
    print(text)
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}")


if __name__ == "__main__":
    main()
