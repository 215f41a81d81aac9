"""First-chunk latency of a streaming handler: how soon a client sees the first of its answers.

    .venv/bin/python benchmarks/streaming.py                   # ours and TorchServe 0.12, c=1 and c=4
    .venv/bin/python benchmarks/streaming.py --skip-torchserve

One .mar, built by our archiver, holds TorchServe's documented streaming handler
(``send_intermediate_predict_response`` from ``ts.handler_utils.utils``): ``--chunks`` intermediate
answers ``--gap-ms`` apart, then the last. Each server (ours from this checkout, TorchServe from
``.venv-ts``) serves it with ``--workers`` workers; clients read ``/predictions`` with ``stream=True`` at
each concurrency and time the first chunk and the whole answer. The first chunk is the server's own
latency (the handler sends it at once); the whole answer is about ``chunks x gap``: a server that held
the chunks back would show a first chunk as late as the whole. Medians and p90 per server, then ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _torchserve
import requests
from _common import REPO, free_port, stop_server, wait_ready_file

HANDLER = """
import time

from ts.handler_utils.utils import send_intermediate_predict_response

CHUNKS, GAP_S = {chunks}, {gap_s}


def handle(data, context):
    if data is None:
        return None
    for i in range(CHUNKS):
        token = [f"token {{i}} "]
        send_intermediate_predict_response(token, context.request_ids, "Intermediate", 200, context)
        time.sleep(GAP_S)
    return ["end"]
"""


def build(out: Path, args: argparse.Namespace) -> Path:
    from archiver.build import build_archive

    work = out / "stream-work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "stream_handler.py").write_text(HANDLER.format(chunks=args.chunks, gap_s=args.gap_ms / 1000))
    config = work / "config.yaml"
    config.write_text(f"minWorkers: {args.workers}\nmaxWorkers: {args.workers}\nresponseTimeout: 60\n")
    store = out / "stream-store"
    store.mkdir(exist_ok=True)
    built = build_archive(
        model_name="streamer",
        version="1.0",
        handler=str(work / "stream_handler.py"),
        config_file=str(config),
        export_path=str(store),
        force=True,
    )
    return Path(built)


@contextlib.contextmanager
def ours(mar: Path, out: Path) -> Iterator[str]:
    port, ready = free_port(), out / "stream-ours-ready.json"
    ready.unlink(missing_ok=True)
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "archiver.cli", "serve"]
    cmd += ["--model-store", str(mar.parent), "--models", f"streamer={mar.name}", "--port", str(port)]
    cmd += ["--management-port", str(free_port()), "--metrics-port", str(free_port())]
    cmd += ["--cache-dir", str(out / "stream-cache"), "--ready-file", str(ready)]
    with open(out / "stream-ours.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out)
        try:
            wait_ready_file(ready, proc, 180)
            yield f"http://127.0.0.1:{port}/predictions/streamer"
        finally:
            stop_server(proc)


def one(url: str) -> tuple[float, float, int]:
    """(seconds to the first chunk, seconds to the last, chunks) of one streamed answer."""
    started = time.perf_counter()
    first = None
    count = 0
    with requests.post(url, data="go", stream=True, timeout=60) as response:
        response.raise_for_status()
        for chunk in response.iter_content(chunk_size=None):
            if chunk:
                count += 1
                first = first if first is not None else time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started, count


def wait_answering(url: str, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.post(url, data="go", timeout=30).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {limit_s:g} s")


def measure(url: str, concurrency: int, requests_each: int) -> dict[str, float]:
    wait_answering(url)
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda _: one(url), range(concurrency * requests_each)))
    firsts = sorted(r[0] * 1000 for r in runs)
    totals = sorted(r[1] * 1000 for r in runs)
    return {
        "first_p50": statistics.median(firsts),
        "first_p90": firsts[int(0.9 * (len(firsts) - 1))],
        "total_p50": statistics.median(totals),
        "chunks": statistics.median(r[2] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=8, help="intermediate answers per request")
    parser.add_argument("--gap-ms", type=float, default=50.0, help="the handler's pause after each")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", default="1,4", help="comma-separated")
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--skip-torchserve", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    mar = build(args.out, args)
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    with ours(mar, args.out) as url:
        results["ours"] = {c: measure(url, c, args.requests) for c in levels}
    if not args.skip_torchserve:
        if not _torchserve.available():
            sys.exit("no TorchServe 0.12 here (benchmarks/setup_torchserve.sh); or --skip-torchserve")
        setup = _torchserve.Setup("torchserve", workers=args.workers)
        home = (args.out / "stream-ts").resolve()
        with _torchserve.started(setup, mar, home, batch=1, delay_ms=0) as ts:
            results["torchserve"] = {c: measure(ts.url, c, args.requests) for c in levels}
    ideal = args.chunks * args.gap_ms
    print(
        f"streaming handler: {args.chunks} chunks {args.gap_ms:g} ms apart, then the last "
        f"(a whole answer takes at least {ideal:g} ms); {args.workers} workers; ms"
    )
    print(
        f"{'server':<12}{'c':>4}{'first p50':>12}{'first p90':>12}{'total p50':>12}"
        f"{'first/total':>13}{'chunks':>8}"
    )
    for server, by_c in results.items():
        for c, r in by_c.items():
            ratio = r["first_p50"] / r["total_p50"]
            print(
                f"{server:<12}{c:>4}{r['first_p50']:>12.1f}{r['first_p90']:>12.1f}{r['total_p50']:>12.1f}"
                f"{ratio:>13.3f}{r['chunks']:>8.0f}"
            )
    if "torchserve" in results:
        for c in levels:
            mine, theirs = results["ours"][c], results["torchserve"][c]
            print(
                f"c={c}: first chunk ours/TorchServe {mine['first_p50'] / theirs['first_p50']:.2f}, "
                f"whole answer {mine['total_p50'] / theirs['total_p50']:.2f}"
            )


if __name__ == "__main__":
    main()
