"""The same archive on three servers, one command: the bundled server, Ray Serve and KServe's own
ModelServer (both through this package's integrations), same client, same machine, same request.

    .venv/bin/python benchmarks/peers.py                       # tiny and ResNet34, 2 rounds, ~5 min
    .venv/bin/python benchmarks/peers.py --models tiny --rounds 1 --duration 3

The models are serve.py's (a tiny Linear 4->2 with JSON rows, batch 32; ResNet34 with random
weights behind a TorchServe-style handler, batch 8; both 5 ms batch delay), archived once. Every
server gets the same request on the route all three answer, KServe's v1 ``POST
/v1/models/NAME:predict`` with one instance per request (``{"instances": [[0.1, 0.2, 0.3, 0.4]]}``,
``{"instances": [{"b64": KITTEN}]}``), from ``hey``. Each server runs as its users would run it:

- ours: ``model-archiver serve`` with its defaults (the archive's batch settings);
- Ray Serve: ``serve run`` of the config ``model-archiver deploy ray`` writes (a local Ray of its own,
  one proxy, HTTP on a free loopback port; ``@serve.batch`` with the archive's batch settings);
  ``--ray-replicas`` replicas of 1 CPU each (default: 1 for tiny, 2 for ResNet34: a replica runs one
  torch thread per CPU it holds, so two replicas are the way to use both cores);
- KServe: ``python -m archiver.integrations.kserve --model_dir DIR`` (KServe's ModelServer, one
  uvicorn worker; KServe batches no requests together in the server, its batcher is a Kubernetes
  sidecar: each request is one batch of one).

A round starts each server in turn for each model (the order reversed every other round, so a busy
spell hits them alike), measures the time to the first answer, warms it (``--warmup`` seconds at the
highest concurrency), then runs c=32 for tiny and c=8 and c=1 for ResNet34, and stops it. Prints every
round's figure, best and median, ratios to ours, each server's configuration; writes
bench-out/peers.json. Every process a server started carries a marker in its environment; exactly
those are ended at the end (never ``ray stop``, which would end other people's Ray on the machine).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import yaml
from _common import KITTEN, REPO, free_port, wait_ready_file
from _models import build_models
from _spread import ratio_lines, spread_table
from serve import hey, wait_first_prediction

BIN = REPO / ".venv" / "bin"
MARK = "ARCHIVER_PEERS_BENCH"
RUNS = {"tiny": ((32, "req_per_s"),), "resnet34": ((8, "req_per_s"), (1, "p50_ms"))}


def marked(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get(MARK) == mark:
                found.append(proc)
    return found


def engine_env(out: Path, mark: str) -> dict[str, str]:
    env = {
        **os.environ,
        MARK: mark,
        "MODEL_ARCHIVER_CACHE": str(out / "cache"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, never someone else's cluster
    return env


def stop(proc: subprocess.Popen, mark: str, sigint: bool) -> None:
    """SIGINT (``serve run`` then shuts its Ray down) or SIGTERM, then end whatever carries the mark."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT if sigint else signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    deadline = time.monotonic() + 20
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.25)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def started(engine: str, name: str, mar: Path, args: argparse.Namespace) -> Iterator[dict]:
    """One server on ``mar``: its v1 URL and its configuration while the block runs; stopped after."""
    out = args.out / f"{engine}-{name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mark = uuid.uuid4().hex
    port = free_port()
    if engine == "ours":
        ready = out / "ready.json"
        cmd = [
            str(BIN / "model-archiver"),
            "serve",
            "--model-store",
            str(mar.parent),
            "--models",
            f"{name}={mar.name}",
        ]
        cmd += [
            "--port",
            str(port),
            "--management-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
        ]
        cmd += ["--grpc-port", str(free_port()), "--grpc-management-port", str(free_port())]
        cmd += ["--cache-dir", str(out / "cache"), "--ready-file", str(ready)]
        config = "model-archiver serve, defaults (the archive's batch settings)"
    elif engine == "ray":
        replicas = args.ray_replicas[name]
        path = out / "serve_config.yaml"
        deploy = [str(BIN / "model-archiver"), "deploy", "ray", str(mar), "--replicas", str(replicas)]
        subprocess.run(
            [*deploy, "--port", str(port), "-o", str(path), "-f"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        document = yaml.safe_load(path.read_text())
        document["proxy_location"] = "HeadOnly"  # one machine: one proxy
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        cmd = [str(BIN / "serve"), "run", str(path)]
        config = f"Ray Serve (serve run of `model-archiver deploy ray --replicas {replicas}`, 1 CPU each)"
    else:
        cmd = [str(BIN / "python"), "-m", "archiver.integrations.kserve", "--model_dir", str(mar)]
        cmd += ["--http_port", str(port), "--grpc_port", str(free_port())]
        config = "KServe ModelServer (python -m archiver.integrations.kserve, 1 uvicorn worker, defaults)"
    url = f"http://127.0.0.1:{port}/v1/models/{name}:predict"
    body = (args.out / f"{name}-v1.json").read_bytes()
    with open(out / "server.log", "wb") as log:
        began = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=out,
            env=engine_env(out, mark),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        startup = wait_first_prediction(url, body, "application/json", began, limit_s=300, proc=proc)
        if engine == "ours":
            workers = len(wait_ready_file(ready, proc, 30)["workers"][name])
            config += f", {workers} worker(s)"
        yield {"url": url, "config": config, "startup_s": startup}
    finally:
        stop(proc, mark, sigint=engine == "ray")


def session(engine: str, name: str, mar: Path, args: argparse.Namespace) -> dict:
    body_file = args.out / f"{name}-v1.json"
    with started(engine, name, mar, args) as server:
        top = max(c for c, _ in RUNS[name])
        hey(server["url"], top, args.warmup, body_file, "application/json")
        got = {"config": server["config"], "startup_s": server["startup_s"]}
        for c, _ in RUNS[name]:
            got[f"c{c}"] = hey(server["url"], c, args.duration, body_file, "application/json")
        return got


def report(rounds: list[dict], engines: list[str], names: list[str]) -> str:
    parts = ["Configurations:"]
    for name in names:
        for engine in engines:
            parts.append(f"- {name}, {engine}: {rounds[0][engine][name]['config']}")
    parts.append("")
    for name in names:
        for c, key in RUNS[name]:
            higher = key == "req_per_s"
            unit = "req/s" if name == "tiny" and higher else "img/s" if higher else "ms p50"
            series = {e: [r[e][name][f"c{c}"].get(key) for r in rounds] for e in engines}
            title = f"{name} c={c}"
            parts.append(spread_table(title, unit, series, higher))
            parts += ratio_lines(
                f"{title} {unit}", "ours", series, higher, [e for e in engines if e != "ours"]
            )
            parts.append("")
        series = {e: [r[e][name]["startup_s"] for r in rounds] for e in engines}
        parts.append(spread_table(f"{name} start to first answer", "s", series, higher=False))
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per load run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="tiny,resnet34", help="comma-separated: tiny, resnet34")
    parser.add_argument("--engines", default="ours,ray,kserve", help="comma-separated: ours, ray, kserve")
    parser.add_argument("--ray-replicas", default="tiny=1,resnet34=2", help="Ray replicas per model")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "peers")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("benchmarks/peers.py needs hey: apt-get install -y hey")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.ray_replicas = {k: int(v) for k, v in (p.split("=") for p in args.ray_replicas.split(","))}
    names, engines = args.models.split(","), args.engines.split(",")
    mars = {k: Path(v) for k, v in build_models(args.out, 8, 32, 5).items()}
    (args.out / "tiny-v1.json").write_text(json.dumps({"instances": [[0.1, 0.2, 0.3, 0.4]]}))
    image = {"b64": base64.b64encode(KITTEN.read_bytes()).decode()}
    (args.out / "resnet34-v1.json").write_text(json.dumps({"instances": [image]}))
    print(f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    began = time.monotonic()
    rounds = []
    for number in range(1, args.rounds + 1):
        one: dict = {e: {} for e in engines}
        for name in names:
            for engine in engines if number % 2 else list(reversed(engines)):
                one[engine][name] = session(engine, name, mars[name], args)
                figures = {
                    k: (round(v["req_per_s"]), v["p50_ms"])
                    for k, v in one[engine][name].items()
                    if k[1:].isdigit()
                }
                start = one[engine][name]["startup_s"]
                print(
                    f"round {number} {engine} {name}: {figures}, first answer {start:.1f} s",
                    flush=True,
                )
        rounds.append(one)
    text = report(rounds, engines, names)
    (args.out / "peers.json").write_text(json.dumps(rounds, indent=2))
    print()
    print(text)
    print(f"load average after {os.getloadavg()[0]:.2f}; {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
