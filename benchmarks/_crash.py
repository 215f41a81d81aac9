"""The crash phase of benchmarks/soak.py: workers SIGKILLed under load, and every request still answered.

A fresh server holds the soak's two models. While 10,000 good requests (half photos for ``cnn``, half
payloads for ``echo``, in random order, each with its own x-request-id) go out at the soak's
concurrency, one model's worker process is SIGKILLed every few seconds: its PID comes from
``GET /models/{m}`` on the management port, and a worker is killed only once it has been up a second
(so each replacement serves some batches first) and only if it is a worker of this server. Passes when:
every request to the other models got a 200 with its own answer; every request to the killed model
got its own answer (200) or a 500/503 JSON error; no request timed out or lost its connection, and
sent == answered for each model; the server recorded each kill as a death; the other models' workers
were never replaced; and the killed model serves again at the end.

The crash-loop window is shortened (``--death-window``, 10 s) so that the kills, a few seconds apart,
exercise restarts rather than the give-up rule (5 endings within the window: the model FAILED).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
from _common import free_port, stop_server, wait_ready_file

Judge = Callable[[dict, int, str | None, bytes], str | None]  # None when the answer is right


def crash_plan(count: int, images: list[bytes], seed: int = 11) -> list[dict]:
    """Good requests only, half for each model: any answer but 200 is the crash's doing."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        rid = f"crash-{i:06d}"
        if rng.random() < 0.5:
            req = {"kind": "echo", "model": "echo", "body": f"req-{i}".encode(), "status": 200}
        else:
            which = rng.randrange(len(images))
            req = {"kind": "image", "model": "cnn", "body": images[which], "status": 200, "image": which}
        requests.append({"id": rid, "index": i, **req})
    return requests


def _error_ok(status: int, body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return f"{status} answer is not JSON: {body[:120]!r}"
    if (
        not isinstance(payload, dict)
        or set(payload) != {"code", "type", "message"}
        or payload["code"] != status
    ):
        return f"{status} error is not {{code,type,message}}: {payload}"
    return None


class Killer:
    """SIGKILLs the victim model's worker every ``every_s`` seconds (once it has been up ``up_s``)."""

    def __init__(self, mgmt: str, model: str, server_pid: int, every_s: float, up_s: float = 1.0) -> None:
        self.mgmt, self.model = mgmt, model
        self.server_pid = server_pid
        self.every_s, self.up_s = every_s, up_s
        self.kills: list[dict] = []
        self.outages: list[tuple[float, float]] = []  # (kill, replacement first seen serving)
        self.poll_failures = 0
        self._first_seen: dict[int, float] = {}

    async def workers(self, session) -> list[dict] | None:
        desc = await describe_with(session, self.mgmt, self.model)
        return desc.get("workers") if isinstance(desc, dict) else None

    def _ours(self, pid: int) -> bool:
        try:
            proc = psutil.Process(pid)
            return proc.ppid() == self.server_pid and "archiver.serving.worker.main" in " ".join(
                proc.cmdline()
            )
        except psutil.Error:
            return False

    async def run(self, session, done: asyncio.Event) -> None:
        last_kill = time.monotonic()
        while not done.is_set():
            workers = await self.workers(session)
            now = time.monotonic()
            if workers is None:
                self.poll_failures += 1
            live = [w for w in workers or [] if w.get("status") in ("READY", "BUSY") and w.get("pid")]
            for w in live:
                if w["pid"] not in self._first_seen:
                    self._first_seen[w["pid"]] = now
                    if self.outages and self.outages[-1][1] == float("inf"):
                        self.outages[-1] = (self.outages[-1][0], now)
            ripe = [w for w in live if now - self._first_seen[w["pid"]] >= self.up_s]
            if ripe and now - last_kill >= self.every_s and self._ours(ripe[0]["pid"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ripe[0]["pid"], signal.SIGKILL)
                    last_kill = time.monotonic()
                    self.kills.append({"at_s": last_kill, "pid": ripe[0]["pid"], "status": ripe[0]["status"]})
                    self.outages.append((last_kill, float("inf")))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.2)


async def fire_and_kill(
    base: str, killer: Killer, requests: list[dict], concurrency: int, timeout_s: float, judge: Judge
) -> dict:
    """Send every request (each with a timeout) while the killer runs; count what came back."""
    import aiohttp

    victim = killer.model
    counts: Counter = Counter()  # (model, status or "timeout"/"connection error")
    sent: Counter = Counter()
    answered: Counter = Counter()
    answered_at: list[tuple[str, float]] = []
    problems: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    done = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s), connector=connector
    ) as s:
        killing = asyncio.get_running_loop().create_task(killer.run(s, done))

        async def client() -> None:
            while not queue.empty():
                req = queue.get_nowait()
                model = req["model"]
                sent[model] += 1
                try:
                    async with s.post(
                        f"{base}/predictions/{model}",
                        data=req["body"],
                        headers={"x-request-id": req["id"], "Content-Type": "application/octet-stream"},
                    ) as resp:
                        body = await resp.read()
                        status, rid = resp.status, resp.headers.get("x-request-id")
                except asyncio.TimeoutError:
                    counts[(model, "timeout")] += 1
                    problems.append(f"{req['id']} ({model}): no answer within {timeout_s:g} s")
                    continue
                except aiohttp.ClientError as exc:
                    counts[(model, "connection error")] += 1
                    problems.append(f"{req['id']} ({model}): {type(exc).__name__}: {exc}")
                    continue
                answered[model] += 1
                answered_at.append((model, time.monotonic()))
                counts[(model, status)] += 1
                if model == victim and status in (500, 503):
                    wrong = None if rid == req["id"] else f"x-request-id {rid!r}"
                    wrong = wrong or _error_ok(status, body)
                else:
                    wrong = judge(req, status, rid, body)
                if wrong:
                    problems.append(f"{req['id']} ({model}): {wrong}")

        try:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        finally:
            done.set()
            await killing
        served_during_outages = sum(
            1 for m, t in answered_at if m != victim and any(a <= t <= b for a, b in killer.outages)
        )
    return {
        "counts": counts,
        "sent": sent,
        "answered": answered,
        "problems": problems,
        "others_answered_while_victim_down": served_during_outages,
    }


async def _describe(mgmt: str, model: str) -> dict | None:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        return await describe_with(s, mgmt, model)


async def describe_with(session, mgmt: str, model: str) -> dict | None:
    """``GET /models/{model}``'s description (None on any failure; 5 s timeout)."""
    import aiohttp

    try:
        async with session.get(f"{mgmt}/models/{model}", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return (await resp.json())[0] if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, LookupError, TypeError):
        return None


async def _recovered(base: str, mgmt: str, model: str, body: bytes, limit_s: float = 60) -> bool:
    """The victim has a live worker again and answers a request with 200, within ``limit_s``."""
    import aiohttp

    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        while time.monotonic() < deadline:
            desc = await describe_with(s, mgmt, model)
            if desc and desc["status"] == "READY" and any(w["status"] == "READY" for w in desc["workers"]):
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with s.post(f"{base}/predictions/{model}", data=body) as resp:
                        await resp.read()
                        if resp.status == 200:
                            return True
            await asyncio.sleep(0.5)
    return False


def run_crash_phase(args, store: Path, images: list[bytes], expected_answers, judge_for) -> bool:
    """Start a server, fire the crash plan while killing ``args.victim``'s worker; print; True if passed."""
    out = args.out / "crash"
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.yaml").write_text(f"worker_death_window: {args.death_window}\nmax_worker_deaths: 5\n")
    ports = [free_port() for _ in range(3)]
    cmd = [str(Path(sys.executable).parent / "model-archiver"), "serve", "--model-store", str(store)]
    cmd += ["--models", "all", "--port", str(ports[0]), "--management-port", str(ports[1])]
    cmd += ["--metrics-port", str(ports[2]), "--batch-size", "8", "--max-batch-delay", "5"]
    cmd += ["--job-queue-size", str(args.concurrency * 2), "--config", str(out / "server.yaml")]
    cmd += ["--cache-dir", str(args.out / "cache"), "--ready-file", str(out / "ready.json")]
    (out / "ready.json").unlink(missing_ok=True)
    base, mgmt = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
    requests = crash_plan(args.crash_requests, images)
    log = open(out / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = wait_ready_file(out / "ready.json", server, 120)
        expected = asyncio.run(expected_answers(base, images))
        killer = Killer(mgmt, args.victim, server.pid, args.kill_every)
        started = time.perf_counter()
        result = asyncio.run(
            fire_and_kill(base, killer, requests, args.concurrency, args.crash_timeout, judge_for(expected))
        )
        elapsed = time.perf_counter() - started
        victim_body = next(r["body"] for r in requests if r["model"] == args.victim)
        recovered = asyncio.run(_recovered(base, mgmt, args.victim, victim_body))
        described = {m: asyncio.run(_describe(mgmt, m)) for m in ready["workers"]}
        server_alive = server.poll() is None
    finally:
        stop_server(server)
        log.close()
    return report(args, requests, result, killer, ready, described, recovered, server_alive, elapsed)


def report(args, requests, result, killer, ready, described, recovered, server_alive, elapsed) -> bool:
    victim = args.victim
    counts, sent, answered = result["counts"], result["sent"], result["answered"]
    deaths = (described.get(victim) or {}).get("deaths", [])
    killed = {k["pid"] for k in killer.kills}
    recorded = [d for d in deaths if d.get("pid") in killed and d.get("cause") == "SIGKILL"]
    others_replaced = {
        m: sorted(ready["workers"][m]) != sorted(w["pid"] for w in (d or {}).get("workers", []))
        for m, d in described.items()
        if m != victim
    }
    checks = {
        "every request sent": sum(sent.values()) == len(requests),
        "sent == answered for every model": all(sent[m] == answered[m] for m in sent),
        "no timeouts or connection errors": not any(isinstance(s, str) for _, s in counts),
        "other models: every answer 200 and right": all(s == 200 for (m, s) in counts if m != victim),
        f"{victim}: only 200, 500, 503": all(s in (200, 500, 503) for (m, s) in counts if m == victim),
        "every answer its own (ids, payloads, JSON errors)": not result["problems"],
        "at least one kill": len(killer.kills) > 0,
        "every kill recorded as a death (SIGKILL)": len(recorded) == len(killer.kills) or len(deaths) >= 50,
        "other models' workers never replaced": not any(others_replaced.values()),
        f"{victim} serves again afterwards": recovered,
        "server still running": server_alive,
    }
    summary = {
        "requests": len(requests),
        "concurrency": args.concurrency,
        "client_timeout_s": args.crash_timeout,
        "seconds": round(elapsed, 1),
        "victim": victim,
        "kills": len(killer.kills),
        "kills_of_busy_workers": sum(1 for k in killer.kills if k["status"] == "BUSY"),  # as last polled
        "deaths_recorded": len(recorded),
        "death_window_s": args.death_window,
        "management_polls_failed": killer.poll_failures,
        "sent": dict(sent),
        "answered": dict(answered),
        "by_model_and_status": {f"{m} {s}": n for (m, s), n in sorted(counts.items(), key=str)},
        "others_answered_while_victim_down": result["others_answered_while_victim_down"],
        "checks": checks,
    }
    (args.out / "crash" / "crash.json").write_text(json.dumps(summary, indent=2))
    print("\ncrash phase:")
    print(json.dumps({k: v for k, v in summary.items() if k != "checks"}, indent=2))
    t0 = killer.kills[0]["at_s"] if killer.kills else 0.0
    gaps = [f"+{k['at_s'] - t0:.1f}s pid {k['pid']} ({k['status']})" for k in killer.kills]
    print("kills:", ", ".join(gaps) or "none")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    for line in result["problems"][:20]:
        print("PROBLEM", line)
    passed = all(checks.values())
    print("CRASH PHASE PASSED" if passed else "CRASH PHASE FAILED")
    return passed
