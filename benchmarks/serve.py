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
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
from _bare import run_bare
from _common import (
    KITTEN,
    REPO,
    MemorySampler,
    free_port,
    kill_leftovers,
    our_child_role,
    stop_server,
    tree_roles,
    wait_ready_file,
)
from _serve_report import CONCURRENCY, merge_rounds, report, report_memory, report_shapes, report_targets

TS_VENV = REPO / ".venv-ts"

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


def load_runs(url: str, duration: float, body_file: Path, ctype: str, roles) -> dict:
    """Warm-up, the timed runs at each concurrency, then memory under c=32 load in a run of its own
    (reading a torch process's memory maps costs CPU, which the timed runs must not pay)."""
    hey(url, 8, min(3.0, duration), body_file, ctype)  # warm-up: allocator, JIT profiling, caches
    runs = {f"c{c}": hey(url, c, duration, body_file, ctype) for c in CONCURRENCY}
    with MemorySampler(roles) as mem:
        hey(url, 32, min(5.0, duration), body_file, ctype)
    return {**runs, "memory": mem.result()}


def shapes(cores: int) -> dict[str, tuple[int, int]]:
    """The ways to fill the cores: 'PxT' -> (processes, torch threads each)."""
    pairs = {(1, cores), (cores, 1)}
    return {f"{p}x{t}": (p, t) for p, t in sorted(pairs)}


# ---- the servers --------------------------------------------------------------------------------
def run_ours(
    name: str, mar: Path, shape: tuple[int, int], duration: float, body_file: Path, ctype: str, out: Path
) -> dict:
    ports = [free_port() for _ in range(3)]
    ready_file = out / f"ours-{name}-ready.json"
    ready_file.unlink(missing_ok=True)
    cmd = [str(REPO / ".venv" / "bin" / "model-archiver"), "serve", "--model-store", str(mar.parent)]
    cmd += ["--models", f"{name}={mar.name}", "--port", str(ports[0]), "--management-port", str(ports[1])]
    cmd += [
        "--metrics-port",
        str(ports[2]),
        "--cache-dir",
        str(out / "cache"),
        "--ready-file",
        str(ready_file),
    ]
    cmd += ["--workers", str(shape[0]), "--torch-threads", str(shape[1])]
    url = f"http://127.0.0.1:{ports[0]}/predictions/{name}"
    log = open(out / f"ours-{name}-{shape[0]}x{shape[1]}.log", "w")  # noqa: SIM115 - closed in finally
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        startup = wait_first_prediction(url, body_file.read_bytes(), ctype, started)
        ready = wait_ready_file(ready_file, proc, 30)
        if len(ready["workers"].get(name, [])) != shape[0]:
            raise RuntimeError(f"asked for {shape[0]} workers, READY says {ready['workers']}")
        roles = tree_roles(psutil.Process(proc.pid), "front", our_child_role)
        runs = load_runs(url, duration, body_file, ctype, roles)
        return {"startup_s": startup, "ready_workers": ready["workers"], **runs}
    finally:
        stop_server(proc)
        log.close()


def _ts_env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{TS_VENV / 'bin'}:{os.environ['PATH']}",
        "TS_DISABLE_SYSTEM_METRICS": "true",
    }


def _find_torchserve(home: Path) -> psutil.Process | None:
    """The Java frontend of the TorchServe started in ``home`` (not anyone else's on this machine)."""
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = p.info["cmdline"] or []
        if p.info["cwd"] == str(home) and any("org.pytorch.serve.ModelServer" in c for c in cmdline):
            return p
    return None


def _ts_child_role(proc: psutil.Process) -> str:
    return "worker" if "model_service_worker" in " ".join(proc.cmdline()) else proc.name()


@contextlib.contextmanager
def started_torchserve(name: str, mar: Path, home: Path) -> Iterator[str]:
    """TorchServe 0.12 serving ``mar`` as ``name`` from a fresh ``home`` on free ports: its prediction
    URL while the block runs (it may still be loading); stopped, with every process it started, after."""
    ports = [free_port() for _ in range(3)]
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
    cmd = [str(TS_VENV / "bin" / "torchserve"), "--start", "--ncs", "--model-store", str(mar.parent)]
    cmd += ["--models", f"{name}={mar.name}", "--ts-config", str(home / "config.properties")]
    cmd += ["--disable-token-auth"]
    try:
        # The launcher leaves Java running with its stdout: a pipe here would never reach EOF.
        with open(home / "torchserve-start.log", "w") as log:
            subprocess.run(
                cmd, cwd=home, env=_ts_env(), stdout=log, stderr=subprocess.STDOUT, timeout=120, check=True
            )
        yield f"http://127.0.0.1:{ports[0]}/predictions/{name}"
    finally:
        java = _find_torchserve(home)
        tree = [java, *java.children(recursive=True)] if java is not None else []
        stop = [str(TS_VENV / "bin" / "torchserve"), "--stop"]
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                stop,
                cwd=home,
                env=_ts_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
            )
        kill_leftovers(tree, grace_s=30)  # its workers can outlive a frontend stopped mid-start


def run_torchserve(name: str, mar: Path, duration: float, body_file: Path, ctype: str, out: Path) -> dict:
    home = (out / f"ts-{name}").resolve()
    started = time.perf_counter()
    with started_torchserve(name, mar, home) as url:
        startup = wait_first_prediction(url, body_file.read_bytes(), ctype, started)
        java = _find_torchserve(home)
        if java is None:
            raise RuntimeError("TorchServe answers but its Java process was not found")
        runs = load_runs(url, duration, body_file, ctype, tree_roles(java, "frontend (java)", _ts_child_role))
        return {"startup_s": startup, **runs}


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
        "--shapes", help="processes x threads to run, comma-separated (default: 1xCORES,CORESx1)"
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
    load_before = os.getloadavg()
    mars = build_models(args.out, args.resnet_batch, args.tiny_batch, args.max_batch_delay)
    tiny_body = args.out / "tiny.json"
    tiny_body.write_text(json.dumps([0.1, 0.2, 0.3, 0.4]))
    inputs = {"resnet34": (KITTEN, "image/jpeg"), "tiny": (tiny_body, "application/json")}
    results: dict = {
        "machine": {"cpus": cores, "python": platform.python_version(), "load_before": load_before}
    }
    results["settings"] = vars(args) | {"out": str(args.out), "shapes": list(all_shapes)}
    print(
        f"machine: {cores} cpus, load average before {load_before[0]:.2f}; shapes {list(all_shapes)}",
        flush=True,
    )
    have_ts = (TS_VENV / "bin" / "torchserve").exists() and shutil.which("java")
    if not have_ts or args.skip_torchserve:
        print("TorchServe skipped (run benchmarks/setup_torchserve.sh to compare)", flush=True)
    rounds: list[dict] = []
    for number in range(1, args.rounds + 1):
        # All runs take turns within each round, so a busy spell hits all of them alike.
        one: dict = {"bare_shapes": {}, "ours_shapes": {}}
        for shape, (procs, threads) in all_shapes.items():
            one["bare_shapes"][shape] = run_bare(
                args.out / "work", procs, threads, args.duration, args.resnet_batch, args.tiny_batch
            )
            print(f"round {number} bare {shape}:", json.dumps(one["bare_shapes"][shape]), flush=True)
        for shape, pair in all_shapes.items():
            one["ours_shapes"][shape] = {}
            for name, mar in mars.items():
                got = run_ours(name, mar, pair, args.duration, *inputs[name], args.out)
                one["ours_shapes"][shape][name] = got
                print(f"round {number} ours {shape} {name}:", json.dumps(got), flush=True)
        if have_ts and not args.skip_torchserve:
            one["torchserve"] = {}
            for name, mar in mars.items():
                one["torchserve"][name] = run_torchserve(name, mar, args.duration, *inputs[name], args.out)
                print(f"round {number} torchserve {name}:", json.dumps(one["torchserve"][name]), flush=True)
        rounds.append(one)
    results |= merge_rounds(rounds)
    results["bare"] = merge_rounds(list(results["bare_shapes"].values()))
    results["ours"] = merge_rounds(list(results["ours_shapes"].values()))
    results["rounds"] = rounds
    results["machine"]["load_after"] = os.getloadavg()
    text = "\n\n".join(
        [report(results), report_shapes(results), report_memory(results), report_targets(results)]
    )
    (args.out / "serve.json").write_text(json.dumps(results, indent=2))
    (args.out / "serve.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nload average before {load_before[0]:.2f}, after {results['machine']['load_after'][0]:.2f}")


if __name__ == "__main__":
    main()
