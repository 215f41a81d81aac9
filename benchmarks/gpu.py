"""GPU benchmark, one command: ResNet34 served on the GPU by 2 workers, from TorchScript and from an
AOTInductor package compiled for CUDA, checked and timed against the bare model on the same GPU.

    .venv/bin/python benchmarks/gpu.py                  # about 3-4 minutes on one H100
    .venv/bin/python benchmarks/gpu.py --duration 5

Where torch sees no CUDA GPU it says so and exits 1 before building anything. In one run:

- ResNet34 with random weights (``torchvision.models.resnet34(weights=None)``, seed 0) is traced to
  TorchScript and exported by ``export_model(method="aoti", device="cuda")`` (batch 1 to 8), and both
  go into a .mar with benchmarks/serve.py's TorchServe-style handler, ``deviceType: gpu``, batch 8;
- for each archive, ``model-archiver serve --workers 2``: every worker's device as ``GET /models``
  reports it (what its handler chose, ``cuda:N``) must be a GPU, and the answer for the kitten photo
  must be the CPU's (the eager model on the CPU gives its class the top probability, within 1e-3
  with random weights two classes can be that close, and the same probability, within 2%);
- load from a built-in client (the GPU machine may have no ``hey``; keep-alive connections, one thread
  each): c=8 throughput and c=1 latency, after a warm-up;
- the bare model on the same GPU, in processes of this file driven like benchmarks/_bare.py's:
  decode + preprocess on the CPU, forward and top-1 on the GPU; c=8 is two processes at batch 8 (as
  two workers), c=1 one process at batch 1.

Prints served / bare for both, writes bench-out/gpu/gpu.json and gpu.md, exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from _bare import BareProcess, measure_bare
from _common import KITTEN, REPO, free_port, get_json, stop_server, wait_ready_file
from _load import load
from _models import RESNET_HANDLER
from serve import wait_first_prediction

# A GPU's kernels sum in another order than the CPU's (and cuDNN convolutions use TF32 by default).
PROB_ABS_TOLERANCE = 1e-3
PROB_REL_TOLERANCE = 2e-2


def _transform():
    from torchvision import transforms

    return transforms.Compose(  # the served handler's preprocessing (serve.RESNET_HANDLER)
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )


# ---- the bare model's measuring process -------------------------------------------------------------
def child() -> None:
    """``gpu.py --child KIND PATH DURATION``: _bare.py's protocol (warm/run batchN, BARE lines)."""
    import torch
    from PIL import Image

    kind, path, duration = sys.argv[2:5]
    warnings.filterwarnings("ignore", message=r".*torch\.jit", category=FutureWarning)
    device = torch.device("cuda", 0)
    transform = _transform()
    if kind == "aoti":
        model = torch._inductor.aoti_load_package(path, device_index=0)
    else:
        model = torch.jit.load(path, map_location=device).eval()
    kitten = KITTEN.read_bytes()

    def step(n: int) -> None:
        x = torch.stack([transform(Image.open(io.BytesIO(kitten)).convert("RGB")) for _ in range(n)])
        with torch.inference_mode():
            score, index = model(x.to(device)).softmax(dim=1).max(dim=1)
            score.tolist(), index.tolist()  # back on the CPU, as an answer is: the GPU has finished

    print("BARE " + json.dumps({"loaded": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        n = int(words[1].removeprefix("batch"))
        if words[0] == "warm":
            for _ in range(10):
                step(n)
            print("BARE " + json.dumps({"warm": words[1]}), flush=True)
            continue
        times, end = [], time.perf_counter() + float(duration)
        while time.perf_counter() < end:
            started = time.perf_counter()
            step(n)
            times.append(time.perf_counter() - started)
        print("BARE " + json.dumps({"phase": words[1], "n": n, "times": sorted(times)}), flush=True)


class GpuBareProcess(BareProcess):
    """One bare process of this file, driven exactly like _bare.py's."""

    def __init__(self, kind: str, path: Path, duration: float) -> None:
        cmd = [sys.executable, __file__, "--child", kind, str(path), str(duration)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()


def run_bare_gpu(kind: str, path: Path, duration: float, batch: int, processes: int) -> dict:
    group = [GpuBareProcess(kind, path, duration) for _ in range(processes)]
    try:
        for bare in group:
            bare.expect(300)
        return {
            "batch1": measure_bare(group[:1], "batch1", duration, "img_per_s"),
            "batched": measure_bare(group, f"batch{batch}", duration, "img_per_s"),
        }
    finally:
        for bare in group:
            bare.close()


# ---- building -----------------------------------------------------------------------------------
def build(out: Path, batch: int, delay_ms: int) -> dict:
    """The two archives, and the CPU's answer for the kitten (the eager model, top-1 and its score)."""
    import torch
    import torchvision
    from PIL import Image

    from archiver.build import build_archive
    from archiver.export import export_model

    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet34(weights=None).eval()
    with torch.inference_mode():
        x = _transform()(Image.open(KITTEN).convert("RGB")).unsqueeze(0)
        reference = resnet(x).softmax(dim=1)[0].tolist()
    script = work / "resnet34.pt"
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit", category=FutureWarning)
        torch.jit.save(torch.jit.trace(resnet, torch.rand(1, 3, 224, 224)), str(script))
    started = time.perf_counter()
    package = export_model(
        resnet,
        torch.rand(batch, 3, 224, 224),
        work / "resnet34_cuda.pt2",
        method="aoti",
        max_batch=batch,
        device="cuda",
        on_stage=lambda text: print(
            f"  export: {text} ({time.perf_counter() - started:.0f} s in)", flush=True
        ),
    )
    compile_s = time.perf_counter() - started
    resnet.cpu()  # export_model moved it to the GPU
    (work / "resnet_handler.py").write_text(RESNET_HANDLER)
    config = work / "model-config.yaml"
    # deviceType: gpu: a server that finds no GPU fails the model with the reason, never the CPU.
    config.write_text(f"deviceType: gpu\nbatchSize: {batch}\nmaxBatchDelay: {delay_ms}\n")
    mars = {}
    for kind, serialized in (("torchscript", script), ("aoti", package)):
        mars[kind] = build_archive(
            model_name="resnet34",
            version="1.0",
            handler=str(work / "resnet_handler.py"),
            serialized_file=str(serialized),
            config_file=str(config),
            export_path=str(out / f"store-{kind}"),
            force=True,
        )
    return {
        "mars": mars,
        "files": {"torchscript": script, "aoti": package},
        "reference": reference,
        "compile_s": compile_s,
    }


# ---- our server ---------------------------------------------------------------------------------
def run_ours(
    kind: str, mar: Path, workers: int, duration: float, reference: dict, out: Path, gpus: str
) -> dict:
    """Serve ``mar`` with ``workers`` workers: check their devices and the answer, then time c=8, c=1."""
    ports = [free_port() for _ in range(3)]
    ready_file = out / f"ours-{kind}-ready.json"
    ready_file.unlink(missing_ok=True)
    # This interpreter's own package: the GPU machine's environment may live anywhere.
    cmd = [sys.executable, "-m", "archiver", "serve", "--model-store", str(mar.parent)]
    cmd += ["--models", f"resnet34={mar.name}", "--workers", str(workers), "--gpus", gpus]
    cmd += ["--port", str(ports[0]), "--management-port", str(ports[1]), "--metrics-port", str(ports[2])]
    cmd += ["--cache-dir", str(out / "cache"), "--ready-file", str(ready_file)]
    url = f"http://127.0.0.1:{ports[0]}/predictions/resnet34"
    body = KITTEN.read_bytes()
    log = open(out / f"ours-{kind}.log", "w")  # noqa: SIM115 - closed in finally
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            startup = wait_first_prediction(url, body, "image/jpeg", started, limit_s=300)
        except RuntimeError:
            described = get_json(f"http://127.0.0.1:{ports[1]}/models/resnet34") or [{}]
            raise RuntimeError(
                f"{kind}: no answer; the server says {described[0].get('loadError')}"
            ) from None
        wait_ready_file(ready_file, proc, 60)
        described = get_json(f"http://127.0.0.1:{ports[1]}/models/resnet34")[0]
        devices = [
            {k: w.get(k) for k in ("id", "pid", "device", "gpuId", "gpuMemoryMB", "gpuUsage")}
            for w in described["workers"]
        ]
        answer = _post_json(url, body)
        checks = {
            "workers": len(devices) == workers,
            "every_worker_on_a_gpu": bool(devices)
            and all(str(d["device"]).startswith("cuda") for d in devices),
            "answer_matches_cpu": matches_cpu(answer, reference),
        }
        load(url, body, 8, min(3.0, duration))  # warm-up: CUDA graphs, allocator, caches
        runs = {f"c{c}": load(url, body, c, duration) for c in (8, 1)}
        metrics = _gpu_metrics(f"http://127.0.0.1:{ports[2]}/metrics")
        return {
            "startup_s": startup,
            "devices": devices,
            "answer": answer,
            "checks": checks,
            "gpu_metrics": metrics,
            **runs,
        }
    finally:
        stop_server(proc)
        log.close()


def matches_cpu(answer: dict, reference: list[float]) -> bool:
    """The served top-1 is the CPU's top-1 (or ties it within PROB_ABS_TOLERANCE) with its probability."""
    index, score = answer.get("index"), answer.get("score")
    if not isinstance(index, int) or not isinstance(score, float) or not 0 <= index < len(reference):
        return False
    expected = reference[index]
    return expected >= max(reference) - PROB_ABS_TOLERANCE and abs(score - expected) <= max(
        1e-4, PROB_REL_TOLERANCE * expected
    )


def _post_json(url: str, body: bytes) -> dict:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", parts.path, body=body, headers={"Content-Type": "image/jpeg"})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _gpu_metrics(url: str) -> list[str]:
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except OSError:
        return []
    finally:
        conn.close()
    return [line for line in text.splitlines() if line.startswith("model_archiver_") and "gpu" in line]


# ---- report -------------------------------------------------------------------------------------
def report(results: dict) -> str:
    def f(v: float | None, unit: str) -> str:
        return f"{v:,.1f} {unit}" if v is not None else "n/a"

    def r(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "n/a"

    lines = [
        f"GPU: {results['machine']['gpu']}; {results['settings']['workers']} workers, batch "
        f"{results['settings']['batch']}, {results['settings']['duration']:g} s a run; AOTInductor compile "
        f"{results['compile_s']:.0f} s",
        "",
        "| archive | served c=8 | bare c=8 (a process a worker, batched) | served/bare | served c=1 p50 "
        "| bare c=1 p50 | served/bare | workers' devices | answer = CPU's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("torchscript", "aoti"):
        ours, bare = results["ours"][kind], results["bare"][kind]
        c8, b8 = ours["c8"]["req_per_s"], bare["batched"]["img_per_s"]
        p50, b1 = ours["c1"]["p50_ms"], bare["batch1"]["p50_ms"]
        devices = ", ".join(str(d["device"]) for d in ours["devices"])
        lines.append(
            f"| {kind} | {f(c8, 'img/s')} | {f(b8, 'img/s')} | {r(c8, b8)} | {f(p50, 'ms')} | {f(b1, 'ms')} "
            f"| {r(p50, b1)} | {devices} | {'yes' if ours['checks']['answer_matches_cpu'] else 'NO'} |"
        )
    failed = [
        f"{kind}: {name}"
        for kind, ours in results["ours"].items()
        for name, ok in ours["checks"].items()
        if not ok
    ]
    lines.append("")
    lines.append("CHECKS: " + ("all passed" if not failed else "FAILED " + "; ".join(failed)))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load run")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "gpu")
    parser.add_argument("--batch", type=int, default=8, help="batch size (and the package's --max-batch)")
    parser.add_argument("--workers", type=int, default=2, help="workers per model")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="ms")
    parser.add_argument("--gpus", default="all", help="serve --gpus (all, or indices like 0,1)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        build_kind = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        print(
            f"benchmarks/gpu.py needs a CUDA GPU, and torch sees none ({build_kind}): run it on a GPU "
            "machine",
            file=sys.stderr,
        )
        return 1
    begun = time.perf_counter()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu_name = torch.cuda.get_device_name(0)
    print(f"GPU 0: {gpu_name}; {os.cpu_count()} cpus", flush=True)
    print("building: TorchScript, and AOTInductor for cuda ...", flush=True)
    built = build(args.out, args.batch, args.max_batch_delay)
    results: dict = {
        "machine": {
            "gpu": gpu_name,
            "gpus": torch.cuda.device_count(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {"duration": args.duration, "batch": args.batch, "workers": args.workers},
        "compile_s": built["compile_s"],
        "reference_cpu_top5": sorted(enumerate(built["reference"]), key=lambda p: -p[1])[:5],
        "ours": {},
        "bare": {},
    }
    for kind in ("torchscript", "aoti"):
        served = run_ours(
            kind, built["mars"][kind], args.workers, args.duration, built["reference"], args.out, args.gpus
        )
        results["ours"][kind] = served
        print(f"ours {kind}:", json.dumps(served), flush=True)
        bare = run_bare_gpu(kind, built["files"][kind], args.duration, args.batch, processes=args.workers)
        results["bare"][kind] = bare
        print(f"bare {kind}:", json.dumps(bare), flush=True)
    results["wall_s"] = time.perf_counter() - begun
    text = report(results)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "gpu.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwhole run: {results['wall_s']:.0f} s")
    return 0 if "FAILED" not in text else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
    else:
        sys.exit(main())
