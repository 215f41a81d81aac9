"""Open Inference Protocol cost: the tiny model over v2 (binary FP32 [1, 4]) against /predictions (JSON).

    .venv/bin/python benchmarks/oip.py                      # 10 s per run, 3 rounds
    .venv/bin/python benchmarks/oip.py --duration 3 --rounds 1

One server, one archive (Linear 4->2 as TorchScript behind a bare ``class H(BaseHandler): pass``,
batchSize 32), two routes loaded alternately with ``hey`` at concurrency 32: ``POST
/v2/models/tiny/infer`` with the binary tensor extension (what tritonclient sends by default: the input
and the output binary) and ``POST /predictions/tiny`` with a JSON list. Each route keeps its best run
(noise on a shared machine only slows), and the ratio v2 / predictions is printed with the target
(issue 11: v2 within 10% of /predictions). Writes bench-out/oip.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, free_port, stop_server, wait_ready_file

HANDLER = "from handlers import BaseHandler\n\n\nclass H(BaseHandler):\n    pass\n"
CONCURRENCY = 32


def build_model(work: Path) -> Path:
    """The tiny model as a folder archive (the server accepts folders as it accepts .mar files)."""
    import torch

    folder = work / "tiny"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "MAR-INF").mkdir(parents=True)
    torch.manual_seed(0)
    with torch.inference_mode():
        traced = torch.jit.trace(torch.nn.Linear(4, 2).eval(), torch.rand(1, 4))
    torch.jit.save(traced, str(folder / "tiny.pt"))
    (folder / "handler.py").write_text(HANDLER)
    (folder / "model-config.yaml").write_text("minWorkers: 1\nbatchSize: 32\nmaxBatchDelay: 5\n")
    manifest = {
        "runtime": "python",
        "model": {
            "modelName": "tiny",
            "modelVersion": "1.0",
            "handler": "handler.py",
            "serializedFile": "tiny.pt",
            "configFile": "model-config.yaml",
        },
    }
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    return folder


def v2_binary_body() -> tuple[bytes, int]:
    """(body, JSON header length) of a v2 request with one binary FP32 [1, 4] input, outputs binary."""
    import struct

    head = {
        "inputs": [
            {"name": "input-0", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
        ],
        "parameters": {"binary_data_output": True},
    }
    text = json.dumps(head).encode()
    return text + struct.pack("<4f", 0.1, 0.2, 0.3, 0.4), len(text)


def hey(url: str, duration_s: float, body_file: Path, content_type: str, headers: list[str]) -> dict:
    cmd = ["hey", "-z", f"{duration_s}s", "-c", str(CONCURRENCY), "-m", "POST", "-t", "20"]
    for header in headers:
        cmd += ["-H", header]
    cmd += ["-T", content_type, "-D", str(body_file), url]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    pct = {int(p): float(s) * 1000 for p, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", text)}
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", text)}
    return {"req_per_s": rps, "p50_ms": pct.get(50), "p99_ms": pct.get(99), "codes": codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each route keeps its best")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("benchmarks/oip.py needs hey (apt-get install -y hey)")
    out = args.out / "oip"
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(out)
    v2_body, header_length = v2_binary_body()
    (out / "v2.bin").write_bytes(v2_body)
    (out / "predictions.json").write_text("[0.1, 0.2, 0.3, 0.4]")
    ports = [free_port() for _ in range(3)]
    ready_file = out / "ready.json"
    ready_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "archiver", "serve", "--models", f"tiny={model}", "--port", str(ports[0])]
    cmd += ["--management-port", str(ports[1]), "--metrics-port", str(ports[2])]
    cmd += ["--cache-dir", str(out / "cache"), "--ready-file", str(ready_file)]
    base = f"http://127.0.0.1:{ports[0]}"
    routes = {
        "v2_binary": (
            f"{base}/v2/models/tiny/infer",
            out / "v2.bin",
            "application/octet-stream",
            [f"Inference-Header-Content-Length: {header_length}"],
        ),
        "predictions_json": (f"{base}/predictions/tiny", out / "predictions.json", "application/json", []),
    }
    results: dict[str, list[dict]] = {name: [] for name in routes}
    with open(out / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready_file(ready_file, proc, 120)
            for name, (url, body, ctype, headers) in routes.items():  # warm-up, and a check both answer 200
                warm = hey(url, min(2.0, args.duration), body, ctype, headers)
                if set(warm["codes"]) != {200}:
                    raise RuntimeError(f"{name}: status codes {warm['codes']} (see {out / 'server.log'})")
            for _ in range(args.rounds):
                for name, (url, body, ctype, headers) in routes.items():
                    results[name].append(hey(url, args.duration, body, ctype, headers))
                    time.sleep(0.5)
        finally:
            stop_server(proc)
    best = {name: max(runs, key=lambda r: r["req_per_s"]) for name, runs in results.items()}
    ratio = best["v2_binary"]["req_per_s"] / best["predictions_json"]["req_per_s"]
    report = {"concurrency": CONCURRENCY, "duration_s": args.duration, "runs": results, "best": best}
    report["ratio_v2_over_predictions"] = ratio
    (args.out / "oip.json").write_text(json.dumps(report, indent=2))
    v2, predictions = best["v2_binary"], best["predictions_json"]
    verdict = "met" if ratio >= 0.9 else "missed"
    print(f"tiny model, c={CONCURRENCY}, best of {args.rounds} x {args.duration:g} s each")
    print(f"  v2 binary FP32 [1,4]   {v2['req_per_s']:9.0f} req/s  p50 {v2['p50_ms']:.2f} ms")
    print(
        f"  /predictions JSON      {predictions['req_per_s']:9.0f} req/s  p50 {predictions['p50_ms']:.2f} ms"
    )
    print(f"  ratio v2 / predictions {ratio:.3f}  (target >= 0.90: {verdict})")


if __name__ == "__main__":
    main()
