"""gRPC against REST on the tiny model (Linear 4->2), in one run: ModelInfer vs v2 REST binary vs
/predictions at c=1 and c=32 on our server, then our gRPC Predictions vs TorchServe 0.12's.

    .venv/bin/python benchmarks/grpc.py                      # about 2 minutes
    .venv/bin/python benchmarks/grpc.py --skip-torchserve --duration 3

One client for every protocol, so the protocols differ only where they differ: a separate Python
process (asyncio; aiohttp for REST, grpc.aio for gRPC) keeps ``c`` calls in flight for ``--duration``
seconds, each with a 30 s timeout. On a 2-core machine that client takes a core of its own, so the
req/s figures are the pair's; the server's own cost, the CPU its processes spent per request (front,
and workers), is the figure that says which protocol costs the server more. The tiny model's handler
takes all four ways in (a JSON list, JSON bytes from a gRPC ``input`` field, a v2 FP32 tensor) and does
the same work for each. TorchServe is registered through its management API with batch_size and
max_batch_delay, as ``tiny.py`` registers it, warmed up, and stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# This file is named grpc.py: its folder goes after the installed packages, so that `import grpc`
# finds grpcio and not this script, while _common and _torchserve are still found there.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import psutil  # noqa: E402
from _common import REPO, free_port, stop_server, wait_ready_file  # noqa: E402

HANDLER = '''
"""The tiny model for every protocol: [4 floats] in (a JSON list, JSON bytes, or a v2 [1, 4] tensor's
rows), [2 floats] out, batched."""
import json
import os

import torch

_model = None


def handle(data, context):
    global _model
    if _model is None:
        _model = torch.jit.load(os.path.join(context.system_properties["model_dir"], "tiny.pt"))
    if not data:
        return None
    rows = []
    for row in data:
        value = row.get("data") if row.get("data") is not None else row.get("body")
        if isinstance(value, (bytes, bytearray)):
            value = json.loads(value)
        rows.append(value[0] if isinstance(value[0], list) else value)
    with torch.inference_mode():
        return _model(torch.tensor(rows, dtype=torch.float32)).tolist()
'''
ROW = [0.1, 0.2, 0.3, 0.4]
TS = "org.pytorch.serve.grpc.inference."


def build_tiny(out: Path, batch: int, delay_ms: int) -> Path:
    """The tiny model's .mar with HANDLER, built by our archiver (both servers load this file)."""
    import torch

    from archiver.build import build_archive

    work, store = out / "grpc-work", out / "grpc-store"
    for folder in (work, store):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    torch.manual_seed(0)
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(torch.nn.Linear(4, 2).eval(), torch.rand(1, 4)), work / "tiny.pt")
    (work / "handler.py").write_text(HANDLER)
    (work / "config.yaml").write_text(
        f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch}\nmaxBatchDelay: {delay_ms}\n"
    )
    return Path(
        build_archive(
            model_name="tiny", version="1.0", handler=str(work / "handler.py"),
            serialized_file=str(work / "tiny.pt"), config_file=str(work / "config.yaml"),
            export_path=str(store),
        )
    )  # fmt: skip


# ---- the client (this file run with --client, in its own process) -------------------------------------
def _v2_body() -> tuple[bytes, int]:
    head = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]
    }
    text = json.dumps(head).encode()
    return text + struct.pack("<4f", *ROW), len(text)


async def _caller(kind: str, target: str):  # noqa: ANN202 - returns (call, close)
    if kind in ("grpc-infer", "grpc-predictions"):
        import grpc

        from archiver.serving.front.grpc_api.messages import message

        channel = grpc.aio.insecure_channel(target)
        if kind == "grpc-infer":
            Req = message("inference.ModelInferRequest")
            request = Req(model_name="tiny")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(struct.pack("<4f", *ROW))
            path, Resp = "/inference.GRPCInferenceService/ModelInfer", message("inference.ModelInferResponse")
        else:
            request = message(TS + "PredictionsRequest")(
                model_name="tiny", input={"data": json.dumps(ROW).encode()}
            )
            path, Resp = f"/{TS}InferenceAPIsService/Predictions", message(TS + "PredictionResponse")
        method = channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                     response_deserializer=Resp.FromString)  # fmt: skip

        async def call() -> None:
            await method(request, timeout=30)

        return call, channel.close
    import aiohttp

    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    if kind == "v2-binary":
        body, length = _v2_body()
        url, headers = (
            f"http://{target}/v2/models/tiny/infer",
            {"Inference-Header-Content-Length": str(length)},
        )
        headers["Content-Type"] = "application/octet-stream"
    else:
        url, body, headers = (
            f"http://{target}/predictions/tiny",
            json.dumps(ROW).encode(),
            {"Content-Type": "application/json"},
        )

    async def call() -> None:
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")

    return call, session.close


async def _load(kind: str, target: str, concurrency: int, duration: float) -> dict:
    call, close = await _caller(kind, target)
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def one() -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                await call()
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    await close()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else None
    return {
        "answered": len(latencies),
        "errors": errors,
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": p50,
    }


def client_main(kind: str, target: str, concurrency: int, duration: float) -> None:
    print(json.dumps(asyncio.run(_load(kind, target, concurrency, duration))))


def run_client(
    kind: str, target: str, concurrency: int, duration: float, root: psutil.Process | None
) -> dict:
    """One load run in a client process, with the server's CPU per answered request."""
    procs = [root, *root.children(recursive=True)] if root is not None else []
    before = [p.cpu_times() for p in procs]
    cmd = [sys.executable, __file__, "--client", kind, target, str(concurrency), str(duration)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"client {kind} failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    answered = max(1, result["answered"])
    for name, index in (("front", slice(0, 1)), ("workers", slice(1, None))):
        used = 0.0
        for proc, start in list(zip(procs, before, strict=True))[index]:
            with contextlib.suppress(psutil.Error):
                now = proc.cpu_times()
                used += (now.user + now.system) - (start.user + start.system)
        result[f"{name}_cpu_us"] = used / answered * 1e6
    return result


# ---- the servers ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def ours(mar: Path, out: Path) -> Iterator[dict]:
    ports = [free_port() for _ in range(5)]
    ready_file = out / "grpc-ours-ready.json"
    ready_file.unlink(missing_ok=True)
    cmd = [
        str(REPO / ".venv" / "bin" / "python"),
        "-m",
        "archiver.cli",
        "serve",
        "--model-store",
        str(mar.parent),
    ]
    cmd += ["--models", f"tiny={mar.name}", "--port", str(ports[0]), "--management-port", str(ports[1])]
    cmd += [
        "--metrics-port",
        str(ports[2]),
        "--grpc-port",
        str(ports[3]),
        "--grpc-management-port",
        str(ports[4]),
    ]
    cmd += ["--cache-dir", str(out / "grpc-cache"), "--ready-file", str(ready_file)]
    with open(out / "grpc-ours.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out)
        try:
            wait_ready_file(ready_file, proc, 120)
            yield {
                "http": f"127.0.0.1:{ports[0]}",
                "grpc": f"127.0.0.1:{ports[3]}",
                "root": psutil.Process(proc.pid),
            }
        finally:
            stop_server(proc)


@contextlib.contextmanager
def torchserve(mar: Path, out: Path, batch: int, delay_ms: int) -> Iterator[dict]:
    """TorchServe as ``_torchserve.started`` runs it (its own free gRPC ports, read back from the
    config.properties it wrote)."""
    import _torchserve

    home = (out / "grpc-torchserve").resolve()
    with _torchserve.started(_torchserve.SETUPS["best"], mar, home, batch, delay_ms) as ts:
        lines = (home / "config.properties").read_text().splitlines()
        port = next(line.split("=", 1)[1] for line in lines if line.startswith("grpc_inference_port="))
        yield {"grpc": f"127.0.0.1:{port}", "root": ts.java, "description": ts.description}


def _line(label: str, r: dict) -> str:
    return (
        f"  {label:<34} {r['req_per_s']:>8,.0f} req/s  p50 {r['p50_ms'] or 0:>7.2f} ms  front "
        f"{r['front_cpu_us']:>6.0f} µs/req  workers {r['workers_cpu_us']:>6.0f} µs/req  errors {r['errors']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of c=32 load first, per protocol")
    parser.add_argument("--ts-warmup", type=float, default=15.0, help="TorchServe's warm-up (its JIT)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-batch-delay", type=int, default=5)
    parser.add_argument("--skip-torchserve", action="store_true")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    mar = build_tiny(args.out, args.batch, args.max_batch_delay)
    print(f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict[int, dict]] = {}
    protocols = (
        ("grpc-infer", "grpc"),
        ("v2-binary", "http"),
        ("predictions", "http"),
        ("grpc-predictions", "grpc"),
    )
    with ours(mar, args.out) as server:
        for kind, port in protocols:
            run_client(kind, server[port], 32, args.warmup, None)
            results[kind] = {
                c: run_client(kind, server[port], c, args.duration, server["root"]) for c in (1, 32)
            }
            print(
                f"ours {kind}: {[round(r['req_per_s']) for r in results[kind].values()]} req/s at c=1, 32",
                flush=True,
            )
    ts_ready = not args.skip_torchserve and (REPO / ".venv-ts" / "bin" / "torchserve").exists()
    if ts_ready:
        with torchserve(mar, args.out, args.batch, args.max_batch_delay) as ts:
            run_client("grpc-predictions", ts["grpc"], 32, args.ts_warmup, None)
            results["torchserve-grpc-predictions"] = {
                c: run_client("grpc-predictions", ts["grpc"], c, args.duration, ts["root"]) for c in (1, 32)
            }
            print(f"TorchServe: {ts['description']}")
    print()
    for c in (1, 32):
        print(f"c={c}:")
        for kind, by_c in results.items():
            print(_line(kind, by_c[c]))
        rps = {kind: by_c[c]["req_per_s"] for kind, by_c in results.items()}
        cpu = {kind: by_c[c]["front_cpu_us"] for kind, by_c in results.items()}
        print(f"  ratio req/s gRPC ModelInfer / v2 REST binary: {rps['grpc-infer'] / rps['v2-binary']:.2f}")
        print(f"  ratio req/s gRPC ModelInfer / /predictions:   {rps['grpc-infer'] / rps['predictions']:.2f}")
        front = cpu["grpc-infer"] / cpu["v2-binary"]
        print(f"  ratio front CPU/request ModelInfer / v2 REST binary: {front:.2f}")
        if "torchserve-grpc-predictions" in rps:
            theirs = rps["torchserve-grpc-predictions"]
            print(
                f"  ratio req/s our gRPC Predictions / TorchServe's: {rps['grpc-predictions'] / theirs:.2f}"
            )
    (args.out / "grpc.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
