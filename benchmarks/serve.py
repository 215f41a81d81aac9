"""Serving benchmark, one command: our server vs the bare model vs TorchServe 0.12, same machine, one run.

    .venv/bin/python benchmarks/serve.py                # everything (TorchServe if .venv-ts and java exist)
    .venv/bin/python benchmarks/serve.py --duration 5 --skip-torchserve

Two models, each archived once into a .mar both servers load (its model-config.yaml sets the batching):
ResNet34 with random weights (no weights can be downloaded; speed does not depend on them) behind a
TorchServe-style handler, fed the kitten photo; and a tiny model (Linear 4->2, JSON in and out) that
measures the server's own cost per request. Load comes from ``hey`` (apt-get install -y hey) at
concurrency 1, 8 and 32; every client call has a timeout, and TorchServe is stopped in a ``finally``.
The bare model is the limit: decode + preprocess + forward in-process at the same batch size.
Prints a table with ratios and writes bench-out/serve.json. Everything runs --rounds times (default 2)
and the table keeps the best figure of each measure: on a shared machine noise only ever slows a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
KITTEN = REPO / "tests" / "data" / "kitten.jpg"
TS_VENV = REPO / ".venv-ts"
CONCURRENCY = (1, 8, 32)

RESNET_HANDLER = '''
"""ResNet34 handler in TorchServe's style: batched decode + ImageNet preprocessing, top-1 answer."""
import io

import torch
from PIL import Image
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler

TRANSFORM = transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


class ResnetHandler(BaseHandler):
    def preprocess(self, data):
        images = []
        for row in data:
            payload = row.get("data") or row.get("body")
            images.append(TRANSFORM(Image.open(io.BytesIO(payload)).convert("RGB")))
        return torch.stack(images)

    def postprocess(self, out):
        probs = torch.softmax(out, dim=1)
        score, index = probs.max(dim=1)
        return [{"index": int(i), "score": float(s)} for i, s in zip(index, score)]
'''

TINY_HANDLER = '''
"""Tiny JSON model: [4 floats] in, [2 floats] out, batched."""
import os

import torch

_model = None


def handle(data, context):
    global _model
    if _model is None:
        _model = torch.jit.load(os.path.join(context.system_properties["model_dir"], "tiny.pt"))
    if not data:
        return None
    rows = [row.get("body") if row.get("body") is not None else row.get("data") for row in data]
    with torch.inference_mode():
        out = _model(torch.tensor(rows, dtype=torch.float32))
    return out.tolist()
'''

BARE = """
import io, json, statistics, sys, time
import torch
from PIL import Image
from torchvision import transforms
TRANSFORM = transforms.Compose([  # the same preprocessing as the served handler
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])
torch.set_num_threads(int(sys.argv[4]))
model = torch.jit.load(sys.argv[2]).eval()
kitten = open(sys.argv[3], "rb").read()
duration = float(sys.argv[5])

def step(n):  # what one batch costs a server at best: decode, preprocess, forward, top-1
    x = torch.stack([TRANSFORM(Image.open(io.BytesIO(kitten)).convert("RGB")) for _ in range(n)])
    with torch.inference_mode():
        model(x).softmax(dim=1).max(dim=1)

def measure(n):
    for _ in range(5):  # TorchScript's profiling executor optimizes on the first runs
        step(n)
    times, end = [], time.perf_counter() + duration
    while time.perf_counter() < end:
        t = time.perf_counter(); step(n); times.append(time.perf_counter() - t)
    times.sort()
    return {"img_per_s": n * len(times) / sum(times), "p50_ms": 1000 * times[len(times) // 2],
            "p99_ms": 1000 * times[min(len(times) - 1, int(len(times) * 0.99))]}

out = {"batch1": measure(1), "batch8": measure(8)}
tiny = torch.jit.load(sys.argv[6])
body = json.dumps([0.1, 0.2, 0.3, 0.4]).encode()
n, end = 0, time.perf_counter() + duration
while time.perf_counter() < end:
    rows = [json.loads(body) for _ in range(32)]
    with torch.inference_mode():
        [json.dumps(r) for r in tiny(torch.tensor(rows)).tolist()]
    n += 32
out["tiny_batch32_req_per_s"] = n / duration
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_models(out: Path, resnet_batch: int, tiny_batch: int, delay_ms: int) -> dict[str, Path]:
    """ResNet34 and the tiny model as .mar files (built by our archiver), each with its batching config."""
    import torch
    import torchvision

    from archiver.build import build_archive

    work = out / "work"
    store = out / "store"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet34(weights=None).eval()
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(resnet, torch.rand(1, 3, 224, 224)), work / "resnet34.pt")
    tiny = torch.nn.Linear(4, 2).eval()
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(tiny, torch.rand(1, 4)), work / "tiny.pt")
    (work / "resnet_handler.py").write_text(RESNET_HANDLER)
    (work / "tiny_handler.py").write_text(TINY_HANDLER)
    mars = {}
    for name, handler, weights, batch in [
        ("resnet34", "resnet_handler.py", "resnet34.pt", resnet_batch),
        ("tiny", "tiny_handler.py", "tiny.pt", tiny_batch),
    ]:
        config = work / f"{name}-config.yaml"
        config.write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch}\nmaxBatchDelay: {delay_ms}\n")
        mars[name] = build_archive(
            model_name=name,
            version="1.0",
            handler=str(work / handler),
            serialized_file=str(work / weights),
            config_file=str(config),
            export_path=str(store),
        )
    return mars


def post_ok(url: str, body: bytes, content_type: str, timeout: float = 10) -> bool:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_first_prediction(
    url: str, body: bytes, content_type: str, started: float, limit_s: float = 180
) -> float:
    deadline = started + limit_s
    while time.perf_counter() < deadline:
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


class MemorySampler:
    """Peak RSS of a process tree, sampled every 100 ms while it runs."""

    def __init__(self, find_root) -> None:
        self._find_root = find_root
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            root = self._find_root()
            if root is None:
                continue
            try:
                procs = [root, *root.children(recursive=True)]
                total = sum(p.memory_info().rss for p in procs if p.is_running())
            except psutil.Error:
                continue
            self.peak_mb = max(self.peak_mb, total / 1e6)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def load_runs(url: str, duration: float, body_file: Path, ctype: str) -> dict:
    hey(url, 8, min(3.0, duration), body_file, ctype)  # warm-up: allocator, JIT profiling, caches
    return {f"c{c}": hey(url, c, duration, body_file, ctype) for c in CONCURRENCY}


def run_ours(name: str, mar: Path, duration: float, body_file: Path, ctype: str, out: Path) -> dict:
    ports = [free_port() for _ in range(3)]
    cmd = [str(REPO / ".venv" / "bin" / "model-archiver"), "serve", "--model-store", str(mar.parent)]
    cmd += ["--models", f"{name}={mar.name}", "--port", str(ports[0]), "--management-port", str(ports[1])]
    cmd += ["--metrics-port", str(ports[2]), "--cache-dir", str(out / "cache")]
    url = f"http://127.0.0.1:{ports[0]}/predictions/{name}"
    log = open(out / f"ours-{name}.log", "w")  # noqa: SIM115 - closed in finally
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        startup = wait_first_prediction(url, body_file.read_bytes(), ctype, started)
        root = psutil.Process(proc.pid)
        with MemorySampler(lambda: root) as mem:
            runs = load_runs(url, duration, body_file, ctype)
        return {"startup_s": startup, "memory_mb": mem.peak_mb, **runs}
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def _ts_env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{TS_VENV / 'bin'}:{os.environ['PATH']}",
        "TS_DISABLE_SYSTEM_METRICS": "true",
    }


def _find_torchserve() -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline"]):
        if any("org.pytorch.serve.ModelServer" in part for part in (p.info["cmdline"] or [])):
            return p
    return None


def run_torchserve(name: str, mar: Path, duration: float, body_file: Path, ctype: str, out: Path) -> dict:
    ports = [free_port() for _ in range(3)]
    home = out / f"ts-{name}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "config.properties").write_text(
        textwrap.dedent(
            f"""\
            inference_address=http://127.0.0.1:{ports[0]}
            management_address=http://127.0.0.1:{ports[1]}
            metrics_address=http://127.0.0.1:{ports[2]}
            disable_token_authorization=true
            python={TS_VENV / "bin" / "python"}
            job_queue_size=1000
            """
        )
    )
    url = f"http://127.0.0.1:{ports[0]}/predictions/{name}"
    cmd = [str(TS_VENV / "bin" / "torchserve"), "--start", "--ncs", "--model-store", str(mar.parent)]
    cmd += ["--models", f"{name}={mar.name}", "--ts-config", str(home / "config.properties")]
    cmd += ["--disable-token-auth"]
    started = time.perf_counter()
    try:
        # The launcher leaves Java running with its stdout: a pipe here would never reach EOF.
        with open(home / "torchserve-start.log", "w") as log:
            subprocess.run(
                cmd, cwd=home, env=_ts_env(), stdout=log, stderr=subprocess.STDOUT, timeout=120, check=True
            )
        startup = wait_first_prediction(url, body_file.read_bytes(), ctype, started)
        with MemorySampler(_find_torchserve) as mem:
            runs = load_runs(url, duration, body_file, ctype)
        return {"startup_s": startup, "memory_mb": mem.peak_mb, **runs}
    finally:
        stop = [str(TS_VENV / "bin" / "torchserve"), "--stop"]
        subprocess.run(
            stop, cwd=home, env=_ts_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120
        )
        deadline = time.monotonic() + 30
        while _find_torchserve() is not None and time.monotonic() < deadline:
            time.sleep(0.2)


def run_bare(mars: dict[str, Path], out: Path, duration: float, threads: int) -> dict:
    work = out / "work"
    script = out / "bare.py"
    script.write_text(BARE)
    cmd = [sys.executable, str(script), str(work), str(work / "resnet34.pt"), str(KITTEN), str(threads)]
    cmd += [str(duration), str(work / "tiny.pt")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 10 + 120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def merge_rounds(rounds: list[dict]) -> dict:
    """Best of each measure across rounds, by what the measure's name says is better."""

    def walk(values: list, key: object) -> object:
        if key == "codes":
            return values[0]
        if isinstance(values[0], dict):
            return {k: walk([v[k] for v in values if k in v], k) for k in values[0]}
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not numbers or any(v is not None and v not in numbers for v in values):
            return values[0]  # not a measure (a missing figure counts as no figure, not as the best)
        return max(numbers) if str(key).endswith("per_s") or key == "errors" else min(numbers)

    return walk(rounds, "")


def report(results: dict) -> str:
    """The README table: each measure for the bare model, ours and TorchServe, and their ratios."""
    bare, ours, ts = results["bare"], results["ours"], results.get("torchserve") or {}
    rows = [
        "| measure | bare model | ours | TorchServe 0.12 | ours/bare | TorchServe/bare | ours/TorchServe |"
    ]
    rows.append("|---|---|---|---|---|---|---|")

    def get(side: dict, model: str, run: str, key: str) -> float | None:
        value = side.get(model, {}).get(run, {})
        return value.get(key) if isinstance(value, dict) else value

    def row(label: str, b: float | None, model: str, run: str, key: str, unit: str) -> None:
        o, t = get(ours, model, run, key), get(ts, model, run, key)
        if model not in ours:
            return

        def fmt(v: float | None) -> str:
            return f"{v:,.1f} {unit}" if v is not None else "n/a"

        rows.append(
            f"| {label} | {fmt(b)} | {fmt(o)} | {fmt(t)} | {ratio(o, b)} | {ratio(t, b)} | {ratio(o, t)} |"
        )

    row("ResNet34 c=1 p50 latency", bare["batch1"]["p50_ms"], "resnet34", "c1", "p50_ms", "ms")
    row("ResNet34 c=1 p99 latency", bare["batch1"]["p99_ms"], "resnet34", "c1", "p99_ms", "ms")
    for c in CONCURRENCY:
        limit = bare["batch8" if c > 1 else "batch1"]["img_per_s"]
        row(f"ResNet34 c={c} throughput", limit, "resnet34", f"c{c}", "req_per_s", "img/s")
    for c in (8, 32):
        for pct in ("p50", "p99"):
            row(f"ResNet34 c={c} {pct} latency", None, "resnet34", f"c{c}", f"{pct}_ms", "ms")
    for c in CONCURRENCY:
        limit = bare["tiny_batch32_req_per_s"] if c == 32 else None
        row(f"tiny c={c} throughput", limit, "tiny", f"c{c}", "req_per_s", "req/s")
        row(f"tiny c={c} p50 latency", None, "tiny", f"c{c}", "p50_ms", "ms")
    for name in ("resnet34", "tiny"):
        row(f"{name} server memory (peak RSS)", None, name, "memory_mb", "memory_mb", "MB")
        row(f"{name} start-up to first prediction", None, name, "startup_s", "startup_s", "s")
    return "\n".join(rows)


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
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("benchmarks/serve.py needs hey: apt-get install -y hey")
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    mars = build_models(args.out, args.resnet_batch, args.tiny_batch, args.max_batch_delay)
    tiny_body = args.out / "tiny.json"
    tiny_body.write_text(json.dumps([0.1, 0.2, 0.3, 0.4]))
    inputs = {"resnet34": (KITTEN, "image/jpeg"), "tiny": (tiny_body, "application/json")}
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load_before}
    }
    results["settings"] = vars(args) | {"out": str(args.out)}
    print(f"machine: {os.cpu_count()} cpus, load average before {load_before[0]:.2f}", flush=True)
    have_ts = (TS_VENV / "bin" / "torchserve").exists() and shutil.which("java")
    if not have_ts or args.skip_torchserve:
        print("TorchServe skipped (run benchmarks/setup_torchserve.sh to compare)", flush=True)
    rounds: list[dict] = []
    for number in range(1, args.rounds + 1):
        # bare, ours and TorchServe take turns within each round, so a busy spell hits all of them alike.
        one: dict = {"bare": run_bare(mars, args.out, args.duration, threads=os.cpu_count() or 1)}
        print(f"round {number} bare model:", json.dumps(one["bare"]), flush=True)
        one["ours"] = {}
        for name, mar in mars.items():
            one["ours"][name] = run_ours(name, mar, args.duration, *inputs[name], args.out)
            print(f"round {number} ours {name}:", json.dumps(one["ours"][name]), flush=True)
        if have_ts and not args.skip_torchserve:
            one["torchserve"] = {}
            for name, mar in mars.items():
                one["torchserve"][name] = run_torchserve(name, mar, args.duration, *inputs[name], args.out)
                print(f"round {number} torchserve {name}:", json.dumps(one["torchserve"][name]), flush=True)
        rounds.append(one)
    results |= merge_rounds(rounds)
    results["rounds"] = rounds
    results["machine"]["load_after"] = os.getloadavg()
    (args.out / "serve.json").write_text(json.dumps(results, indent=2))
    table = report(results)
    (args.out / "serve.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nload average before {load_before[0]:.2f}, after {results['machine']['load_after'][0]:.2f}")


if __name__ == "__main__":
    main()
