"""A load generator in Python for the benchmarks that run where ``hey`` may not be installed (a GPU
machine with no network): ``concurrency`` client threads, each with one keep-alive connection."""

from __future__ import annotations

import http.client
import threading
import time
from urllib.parse import urlsplit


def load(url: str, body: bytes, concurrency: int, duration_s: float) -> dict:
    """``concurrency`` clients, each one keep-alive connection posting ``body`` for ``duration_s``."""
    parts = urlsplit(url)
    stop = time.perf_counter() + duration_s
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        mine, bad = [], 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                conn.request("POST", parts.path, body=body, headers={"Content-Type": "image/jpeg"})
                reply = conn.getresponse()
                reply.read()
                ok = reply.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            if ok:
                mine.append(time.perf_counter() - started)
            else:
                bad += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    count = len(latencies)
    return {
        "req_per_s": count / duration_s,
        "p50_ms": 1000 * latencies[count // 2] if count else None,
        "p99_ms": 1000 * latencies[min(count - 1, int(count * 0.99))] if count else None,
        "requests": count,
        "errors": errors[0],
    }
