"""Soak run: thousands of mixed good and bad requests at high concurrency; nothing lost, nothing crossed.

    .venv/bin/python benchmarks/soak.py                       # 10,000 requests at concurrency 64
    .venv/bin/python benchmarks/soak.py --requests 2000 --concurrency 32
    .venv/bin/python benchmarks/soak.py --crash               # then the crash phase (benchmarks/_crash.py)
    .venv/bin/python benchmarks/soak.py --crash-only          # the crash phase alone
    .venv/bin/python benchmarks/soak.py --hostile-only        # good requests with attacks mixed in

One ``model-archiver serve`` process (started once, never restarted) holds two models: a small CNN
behind the built-in image_classifier handler, and an echo handler that returns each request's own
payload (so an answer delivered to the wrong client would show). Requests mix good images (three
different photos, each with a known answer), non-images, per-item rejections, unknown models and
bodies over the size limit. Every request carries its own x-request-id. The run fails (exit 1) unless
each request got exactly one answer of the kind its input calls for, no worker was replaced, and the
server's RSS (the front and its worker processes together: the models live in the workers) grew by
less than 10% between the end of a warm-up (10,000 requests of the same mix, checked too) and the
end of the run.

The crash phase (``--crash``) starts a fresh server and SIGKILLs one model's worker every few seconds
during 10,000 more requests: see benchmarks/_crash.py for what it checks. The hostile phase
(``--hostile``) starts another fresh server and sends 6,000 good requests while every attack of issue 19
(deep JSON, 300k v1 instances, huge and NaN register/scale values, CR/LF and 100 KB headers, a forged
Host, foreign Origin POSTs, a poison request every 2 s) is mixed in: see benchmarks/_hostile.py. Exit 1
if any phase fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
from _common import free_port, stop_server, wait_ready_file

REPO = Path(__file__).resolve().parents[1]
KITTEN = REPO / "tests" / "data" / "kitten.jpg"
MAX_REQUEST_SIZE = 1_000_000

ECHO_HANDLER = '''
"""Echo each request's payload back, or reject it alone (400) when it starts with "bad"."""
from handlers import HandlerInputError


def handle(data, context):
    if not data:
        return None
    out = []
    for row in data:
        text = bytes(row.get("body") or b"").decode()
        out.append(HandlerInputError(f"rejected {text}") if text.startswith("bad") else {"echo": text})
    return out
'''


def build(out: Path) -> Path:
    """The model store: cnn.mar (image_classifier) and echo.mar, built with our own archiver."""
    import torch

    from archiver.build import build_archive
    from archiver.export import export_model

    work, store = out / "work", out / "store"
    work.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    export_model(cnn, torch.rand(1, 3, 224, 224), work / "cnn.pt")
    (work / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(10)}))
    (work / "echo_handler.py").write_text(ECHO_HANDLER)
    common = {"version": "1.0", "export_path": str(store), "force": True}
    build_archive(
        model_name="cnn",
        handler="image_classifier",
        serialized_file=str(work / "cnn.pt"),
        extra_files=str(work / "index_to_name.json"),
        **common,
    )
    build_archive(model_name="echo", handler=str(work / "echo_handler.py"), **common)
    return store


def photos() -> list[bytes]:
    """Three different real images: the kitten, mirrored, and in grayscale as PNG."""
    from PIL import Image, ImageOps

    kitten = Image.open(KITTEN)
    mirrored, gray = io.BytesIO(), io.BytesIO()
    ImageOps.mirror(kitten).save(mirrored, format="JPEG")
    ImageOps.grayscale(kitten).save(gray, format="PNG")
    return [KITTEN.read_bytes(), mirrored.getvalue(), gray.getvalue()]


def plan(count: int, images: list[bytes], seed: int = 7) -> list[dict]:
    """The request mix: each entry says what to send and what kind of answer it must get."""
    rng = random.Random(seed)
    kinds = ["echo"] * 40 + ["echo-bad"] * 10 + ["image"] * 30 + ["not-image"] * 10 + ["unknown"] * 7
    kinds += ["too-large"] * 3
    requests = []
    for i in range(count):
        kind = rng.choice(kinds)
        rid = f"soak-{i:06d}"
        if kind == "echo":
            req = {"model": "echo", "body": f"req-{i}".encode(), "status": 200}
        elif kind == "echo-bad":
            req = {"model": "echo", "body": f"bad-{i}".encode(), "status": 400}
        elif kind == "image":
            which = rng.randrange(len(images))
            req = {"model": "cnn", "body": images[which], "status": 200, "image": which}
        elif kind == "not-image":
            req = {"model": "cnn", "body": b"this is not an image %d" % i, "status": 400}
        elif kind == "unknown":
            req = {"model": "nosuch", "body": b"x", "status": 404}
        else:
            req = {"model": "echo", "body": b"z" * (MAX_REQUEST_SIZE + 1), "status": 413}
        requests.append({"id": rid, "kind": kind, "index": i, **req})
    return requests


def check(req: dict, status: int, rid: str | None, body: bytes, expected_images: list) -> str | None:
    """None if the answer is the right one for this request, else what is wrong with it."""
    if rid != req["id"]:
        return f"x-request-id {rid!r} instead of {req['id']!r}"
    if status != req["status"]:
        return f"status {status} instead of {req['status']} ({body[:120]!r})"
    try:
        payload = json.loads(body)
    except ValueError:
        return f"answer is not JSON: {body[:120]!r}"
    if status >= 400:
        if set(payload) != {"code", "type", "message"} or payload["code"] != status:
            return f"error is not {{code,type,message}}: {payload}"
        if req["kind"] == "echo-bad" and payload["message"] != f"rejected bad-{req['index']}":
            return f"someone else's rejection: {payload['message']}"
        return None
    if req["kind"] == "echo" and payload != {"echo": f"req-{req['index']}"}:
        return f"someone else's answer: {payload}"
    if req["kind"] == "image" and not _same_top5(payload, expected_images[req["image"]]):
        return f"wrong classification for image {req['image']}: {payload}"
    return None


def _same_top5(got: dict, want: dict) -> bool:
    """The same classes with the same scores; batch size changes float rounding, not the answer."""
    if not isinstance(got, dict) or set(got) != set(want):
        return False
    return all(abs(got[k] - want[k]) < 1e-4 for k in want)


async def fire(base: str, requests: list[dict], concurrency: int, expected: list, on_progress) -> dict:
    import aiohttp

    results: dict[str, list] = {r["id"]: [] for r in requests}
    latencies: list[float] = []
    problems: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            while not queue.empty():
                req = queue.get_nowait()
                started = time.perf_counter()
                try:
                    async with s.post(
                        f"{base}/predictions/{req['model']}",
                        data=req["body"],
                        headers={"x-request-id": req["id"], "Content-Type": "application/octet-stream"},
                    ) as resp:
                        body = await resp.read()
                        status, rid = resp.status, resp.headers.get("x-request-id")
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # The server may answer 413 and close before the client finished sending.
                    if req["status"] == 413 and isinstance(exc, aiohttp.ClientError):
                        status, rid, body = 413, req["id"], b'{"code": 413, "type": "closed", "message": ""}'
                    else:
                        problems.append(f"{req['id']}: no answer ({type(exc).__name__}: {exc})")
                        continue
                latencies.append(time.perf_counter() - started)
                results[req["id"]].append(status)
                wrong = check(req, status, rid, body, expected)
                if wrong:
                    problems.append(f"{req['id']} ({req['kind']}): {wrong}")
                on_progress()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    lost = [rid for rid, got in results.items() if len(got) == 0]
    duplicated = [rid for rid, got in results.items() if len(got) > 1]
    return {"latencies": latencies, "problems": problems, "lost": lost, "duplicated": duplicated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=10_000,
        help="requests of the same mix sent first, checked the same way, before RSS is taken as the baseline",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "soak")
    crash = parser.add_argument_group("crash phase (benchmarks/_crash.py)")
    crash.add_argument("--crash", action="store_true", help="after the soak, run the crash phase")
    crash.add_argument("--crash-only", action="store_true", help="run the crash phase alone")
    crash.add_argument("--crash-requests", type=int, default=10_000)
    crash.add_argument("--victim", default="cnn", help="the model whose worker is killed (cnn or echo)")
    crash.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills (at least)")
    crash.add_argument("--death-window", type=float, default=10.0, help="server's worker_death_window, s")
    crash.add_argument("--crash-timeout", type=float, default=30.0, help="client timeout per request, s")
    hostile = parser.add_argument_group("hostile phase (benchmarks/_hostile.py)")
    hostile.add_argument("--hostile", action="store_true", help="then the hostile phase")
    hostile.add_argument("--hostile-only", action="store_true", help="run the hostile phase alone")
    hostile.add_argument("--hostile-requests", type=int, default=6000, help="good requests sent meanwhile")
    hostile.add_argument("--poison-every", type=float, default=2.0, help="seconds between poison requests")
    args = parser.parse_args()
    store = build(args.out)
    images = photos()
    ok = True
    if not (args.crash_only or args.hostile_only):
        ok = soak_phase(args, store, images)
    if args.crash or args.crash_only:
        from _crash import run_crash_phase

        def judge_for(expected: list):
            return lambda req, status, rid, body: check(req, status, rid, body, expected)

        ok = run_crash_phase(args, store, images, _expected_answers, judge_for) and ok
    if args.hostile or args.hostile_only:
        from _hostile import run_hostile_phase

        def judge_for_hostile(expected: list):
            return lambda req, status, rid, body: check(req, status, rid, body, expected)

        ok = run_hostile_phase(args, store, images, _expected_answers, judge_for_hostile) and ok
    sys.exit(0 if ok else 1)


def server_rss_mb(server: psutil.Process) -> tuple[float, float]:
    """(front + workers, front alone) RSS in MB: the handlers' memory is in the worker processes."""
    front = server.memory_info().rss
    workers = 0
    for child in server.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            workers += child.memory_info().rss
    return (front + workers) / 1e6, front / 1e6


def soak_phase(args, store: Path, images: list[bytes]) -> bool:
    ports = [free_port() for _ in range(3)]
    cmd = [str(REPO / ".venv" / "bin" / "model-archiver"), "serve", "--model-store", str(store)]
    cmd += ["--models", "all", "--port", str(ports[0]), "--management-port", str(ports[1])]
    cmd += ["--metrics-port", str(ports[2]), "--batch-size", "8", "--max-batch-delay", "5"]
    cmd += ["--job-queue-size", str(args.concurrency * 2), "--max-request-size", str(MAX_REQUEST_SIZE)]
    cmd += ["--cache-dir", str(args.out / "cache"), "--ready-file", str(args.out / "ready.json")]
    (args.out / "ready.json").unlink(missing_ok=True)
    log = open(args.out / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{ports[0]}"
    try:
        try:
            ready = wait_ready_file(args.out / "ready.json", server, 120)
        except RuntimeError as exc:
            print(f"server did not start ({exc}); see {args.out / 'server.log'}")
            return False
        proc = psutil.Process(server.pid)
        expected = asyncio.run(_expected_answers(base, images))
        requests = plan(args.requests, images)
        # Warm-up: the server's memory grows while it first meets each batch size and request mix
        # (kernels, caches, allocator pools), then stays flat. The warm-up answers are checked too.
        warm_outcome = None
        if args.warmup_requests > 0:
            warm = plan(args.warmup_requests, images)
            warm_outcome = asyncio.run(fire(base, warm, args.concurrency, expected, lambda: None))
        tenth = max(1, len(requests) // 10)
        total, front = server_rss_mb(proc)
        rss: dict = {"after_warmup_mb": total, "front_after_warmup_mb": front}
        done = 0

        curve: list[float] = [round(total, 1)]

        def on_progress() -> None:
            nonlocal done
            done += 1
            if done % tenth == 0:
                curve.append(round(server_rss_mb(proc)[0], 1))

        started = time.perf_counter()
        outcome = asyncio.run(fire(base, requests, args.concurrency, expected, on_progress))
        elapsed = time.perf_counter() - started
        rss["end_mb"], rss["front_end_mb"] = server_rss_mb(proc)
        rss["curve_mb"] = curve
        workers_now = sorted(c.pid for c in proc.children())
        restarted = server.poll() is not None or workers_now != sorted(
            p for v in ready["workers"].values() for p in v
        )
    finally:
        stop_server(server)
        log.close()
    if warm_outcome is not None:
        for key in ("lost", "duplicated", "problems"):
            outcome[key] = [*warm_outcome[key], *outcome[key]]
    return report(args, requests, outcome, elapsed, rss, restarted)


async def _expected_answers(base: str, images: list[bytes]) -> list:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
        answers = []
        for image in images:
            async with s.post(f"{base}/predictions/cnn", data=image) as resp:
                assert resp.status == 200, await resp.text()
                answers.append(json.loads(await resp.read()))
    return answers


def report(args, requests, outcome, elapsed, rss, restarted) -> bool:
    lat = sorted(outcome["latencies"])
    kinds = Counter(r["kind"] for r in requests)
    growth = (rss["end_mb"] - rss["after_warmup_mb"]) / rss["after_warmup_mb"]
    summary = {
        "requests": len(requests),
        "warmup_requests": args.warmup_requests,
        "concurrency": args.concurrency,
        "mix": dict(kinds),
        "answered": len(lat),
        "lost": len(outcome["lost"]),
        "duplicated": len(outcome["duplicated"]),
        "wrong": len(outcome["problems"]),
        "seconds": round(elapsed, 1),
        "req_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1000 * lat[int(len(lat) * 0.99) - 1], 1) if lat else None,
        "rss_after_warmup_mb": round(rss["after_warmup_mb"], 1),
        "rss_end_mb": round(rss["end_mb"], 1),
        "front_rss_after_warmup_mb": round(rss["front_after_warmup_mb"], 1),
        "front_rss_end_mb": round(rss["front_end_mb"], 1),
        "rss_growth_pct": round(100 * growth, 2),
        "rss_every_tenth_mb": rss["curve_mb"],
        "server_exited_or_workers_replaced": restarted,
        "load_average": os.getloadavg()[0],
    }
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    for line in outcome["problems"][:20]:
        print("PROBLEM", line)
    ok = not outcome["problems"] and not outcome["lost"] and not outcome["duplicated"]
    ok = ok and growth < 0.10 and not restarted and len(lat) == len(requests)
    print("SOAK PASSED" if ok else "SOAK FAILED")
    return ok


if __name__ == "__main__":
    main()
