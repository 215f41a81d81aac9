"""The hostile phase of benchmarks/soak.py: good requests flow while hostile ones are mixed in.

A fresh server holds the soak's two models plus ``victim``, an echo handler that ends its own worker
process (``os._exit``) on the payload ``poison``, registered through the management API with batch size
1 (so a poison request's batch is itself alone). Good requests (photos for ``cnn``, payloads for
``echo`` and ``victim``, each with its own x-request-id) go out at the soak's concurrency while a few
attackers cycle through every attack of issue 19 (below), and one poison request goes to ``victim``
every ``--poison-every`` seconds. A thread polls ``/ping`` every 0.1 s and each model's state every
0.5 s. Passes when: every good request got exactly one answer, a 200 with its own payload or
classification (nothing lost, nothing crossed); every attack got a JSON answer with the status it
must get (4xx, 403 for the cross-site ones, 500 for poison), never a dropped connection; no model was
ever seen FAILED; cnn's and echo's workers were never replaced; ``/ping`` always answered within 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from _common import free_port, stop_server, wait_ready_file

VICTIM_HANDLER = '''
"""Echo each payload; the payload "poison" ends this worker process (a request that kills its worker)."""
import os


def handle(data, context):
    if not data:
        return None
    out = []
    for row in data:
        text = bytes(row.get("body") or b"").decode()
        if text == "poison":
            os._exit(3)
        out.append({"echo": text})
    return out
'''
DEEP = b"[" * 100_000 + b"]" * 100_000
Judge = Callable[[dict, int, str | None, bytes], str | None]


def _multipart_deep() -> tuple[bytes, str]:
    head = (
        b'--h0stile\r\nContent-Disposition: form-data; name="data"\r\nContent-Type: application/json\r\n\r\n'
    )
    return head + DEEP + b"\r\n--h0stile--\r\n", "multipart/form-data; boundary=h0stile"


def _request(
    method: str, target: str, host: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def attacks(ports: dict[str, int]) -> list[tuple[str, str, bytes, tuple[int, ...]]]:
    """(label, port, raw request, statuses it may get): every attack issue 19 lists."""
    hosts = {port: f"127.0.0.1:{number}" for port, number in ports.items()}
    refused, json_type = tuple(range(400, 500)), {"Content-Type": "application/json"}
    deep_part, deep_part_type = _multipart_deep()
    v1_huge = b'{"instances": [' + b",".join([b"0"] * 300_000) + b"]}"
    evil = {"Origin": "http://evil.example"}
    register = "/models?url=echo.mar&model_name=hx&"
    crlf = f"POST /predictions/echo HTTP/1.1\r\nHost: {hosts['inference']}\r\nX-A: a\rb\nX-B: c\r\n".encode()
    inf, mgmt, four = "inference", "management", (400,)
    deep_type = {"Content-Type": deep_part_type}
    table = {  # label -> (port, method, target, headers, body, statuses it may get)
        "deep JSON body": (inf, "POST", "/predictions/echo", json_type, DEEP, refused),
        "deep JSON body (cnn)": (inf, "POST", "/predictions/cnn", json_type, DEEP, refused),
        "deep JSON multipart part": (inf, "POST", "/predictions/echo", deep_type, deep_part, refused),
        "v1 300k instances": (inf, "POST", "/v1/models/echo:predict", json_type, v1_huge, refused),
        "scale min_worker=1000000": (mgmt, "PUT", "/models/echo?min_worker=1000000", {}, b"", four),
        "register initial_workers=2**40": (
            mgmt,
            "POST",
            register + "initial_workers=1099511627776",
            {},
            b"",
            four,
        ),
        "register initial_workers=-3": (mgmt, "POST", register + "initial_workers=-3", {}, b"", four),
        "register response_timeout=nan": (mgmt, "POST", register + "response_timeout=nan", {}, b"", four),
        "register body nested deep": (mgmt, "POST", "/models", json_type, DEEP, refused),
        "foreign Origin register": (mgmt, "POST", register + "initial_workers=3", evil, b"", (403,)),
        "foreign Origin predict": (inf, "POST", "/predictions/echo", evil, b"x", (403,)),
        "100 KB header": (inf, "POST", "/predictions/echo", {"X-A": "a" * 100_000}, b"x", refused),
    }
    made = [
        (label, port, _request(method, target, hosts[port], headers, body), allowed)
        for label, (port, method, target, headers, body, allowed) in table.items()
    ]
    made.append(("forged Host", "management", _request("GET", "/models", "evil.example"), (403,)))
    made.append(
        ("CR/LF in a header", "inference", crlf + b"Content-Length: 0\r\nConnection: close\r\n\r\n", refused)
    )
    return made


async def _exchange(port: int, data: bytes, timeout_s: float = 60.0) -> tuple[int | None, bytes]:
    """Raw bytes in, (status, body) out once the server closes; status None when no answer came."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        return None, repr(exc).encode()
    try:
        writer.write(data)
        # The server may answer early (413) and close before the body was all sent.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await writer.drain()
        received = await asyncio.wait_for(reader.read(), timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        return None, repr(exc).encode()
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None, b"closed with: " + received[:200]
    return int(parts[1]), body


def _attack_problem(label: str, status: int | None, body: bytes, allowed: tuple[int, ...]) -> str | None:
    if status is None:
        return f"{label}: no answer ({body[:120]!r})"
    try:
        payload = json.loads(body)
    except ValueError:
        return f"{label}: {status} with a body that is not JSON: {body[:160]!r}"
    if status not in allowed:
        return f"{label}: {status} instead of {allowed[0]}{'..' if len(allowed) > 1 else ''}: {body[:200]!r}"
    if not isinstance(payload, dict) or not (
        {"code", "type", "message"} <= set(payload) or "error" in payload
    ):
        return f"{label}: {status} whose body is not an error: {body[:160]!r}"
    return None


class Monitor(threading.Thread):
    """Polls /ping every 0.1 s (latency) and every model's state every 0.5 s, from its own thread."""

    def __init__(self, base: str, mgmt: str, models: list[str]) -> None:
        super().__init__(daemon=True)
        self.base, self.mgmt, self.models = base, mgmt, models
        self.ping_s: list[float] = []
        self.ping_failures: list[str] = []
        self.states: Counter = Counter()  # (model, state) sightings
        self.stop_event = threading.Event()

    def run(self) -> None:
        last_states = 0.0
        while not self.stop_event.wait(0.1):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.base + "/ping", timeout=10) as resp:
                    resp.read()
            except (urllib.error.URLError, OSError) as exc:
                self.ping_failures.append(repr(exc))
            self.ping_s.append(time.perf_counter() - started)
            if time.monotonic() - last_states >= 0.5:
                last_states = time.monotonic()
                for model in self.models:
                    try:
                        with urllib.request.urlopen(f"{self.mgmt}/models/{model}", timeout=10) as resp:
                            self.states[(model, json.loads(resp.read())[0]["status"])] += 1
                    except (urllib.error.URLError, OSError, ValueError, LookupError):
                        self.states[(model, "unreachable")] += 1


def hostile_plan(count: int, images: list[bytes], seed: int = 13) -> list[dict]:
    """Good requests only, a third for each model: anything but a right 200 is a failure."""
    rng = random.Random(seed)
    plan = []
    for i in range(count):
        model = rng.choice(("echo", "cnn", "victim"))
        req = {"id": f"hostile-{i:06d}", "index": i, "model": model, "status": 200}
        if model == "cnn":
            which = rng.randrange(len(images))
            req.update(kind="image", body=images[which], image=which)
        else:
            req.update(kind="echo", body=f"req-{i}".encode())
        plan.append(req)
    return plan


async def fire_with_attacks(
    base: str, ports: dict[str, int], plan: list[dict], concurrency: int, poison_every_s: float, judge: Judge
) -> dict:
    """Send the good plan at ``concurrency`` while 4 attackers cycle the attacks and poison is paced."""
    import aiohttp

    answers: dict[str, list[int]] = {r["id"]: [] for r in plan}
    problems: list[str] = []
    attack_counts: Counter = Counter()
    attack_problems: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for r in plan:
        queue.put_nowait(r)
    done = asyncio.Event()
    table = attacks(ports)
    poison = (
        "poison",
        "inference",
        _request("POST", "/predictions/victim", f"127.0.0.1:{ports['inference']}", {}, b"poison"),
        (500,),
    )

    async def attacker(n: int) -> None:
        i = n
        while not done.is_set():
            label, port, raw, allowed = table[i % len(table)]
            status, body = await _exchange(ports[port], raw)
            attack_counts[(label, status)] += 1
            if wrong := _attack_problem(label, status, body, allowed):
                attack_problems.append(wrong)
            i += 4

    async def poisoner() -> None:
        while not done.is_set():
            label, port, raw, allowed = poison
            status, body = await _exchange(ports[port], raw, 120)
            attack_counts[(label, status)] += 1
            if wrong := _attack_problem(label, status, body, allowed):
                attack_problems.append(wrong)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), poison_every_s)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def client() -> None:
            while not queue.empty():
                req = queue.get_nowait()
                headers = {"x-request-id": req["id"], "Content-Type": "application/octet-stream"}
                try:
                    async with s.post(
                        f"{base}/predictions/{req['model']}", data=req["body"], headers=headers
                    ) as resp:
                        body, status, rid = await resp.read(), resp.status, resp.headers.get("x-request-id")
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    problems.append(f"{req['id']} ({req['model']}): no answer ({type(exc).__name__}: {exc})")
                    continue
                answers[req["id"]].append(status)
                if wrong := judge(req, status, rid, body):
                    problems.append(f"{req['id']} ({req['model']}): {wrong}")

        hostile = [asyncio.ensure_future(attacker(n)) for n in range(4)] + [asyncio.ensure_future(poisoner())]
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        done.set()
        await asyncio.gather(*hostile)
    return {
        "answers": answers,
        "problems": problems,
        "attack_counts": attack_counts,
        "attack_problems": attack_problems,
        "seconds": elapsed,
    }


def _build_victim(store: Path, out: Path) -> Path:
    """A model store with the soak's archives and victim.mar (built with our own archiver)."""
    from archiver.build import build_archive

    hostile_store = out / "store"
    hostile_store.mkdir(parents=True, exist_ok=True)
    for name in ("cnn.mar", "echo.mar"):
        shutil.copy2(store / name, hostile_store / name)
    (out / "victim_handler.py").write_text(VICTIM_HANDLER)
    build_archive(
        model_name="victim",
        handler=str(out / "victim_handler.py"),
        version="1.0",
        export_path=str(hostile_store),
        force=True,
    )
    return hostile_store


def _call(method: str, url: str, timeout: float = 120) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def run_hostile_phase(args, store: Path, images: list[bytes], expected_answers, judge_for) -> bool:
    """Start a server, fire good requests with the attacks mixed in; print the summary; True if passed."""
    out = args.out / "hostile"
    out.mkdir(parents=True, exist_ok=True)
    hostile_store = _build_victim(store, out)
    ports = {"inference": free_port(), "management": free_port(), "metrics": free_port()}
    cmd = [str(Path(sys.executable).parent / "model-archiver"), "serve", "--model-store", str(hostile_store)]
    cmd += ["--models", "cnn=cnn.mar,echo=echo.mar", "--batch-size", "8", "--max-batch-delay", "5"]
    cmd += ["--port", str(ports["inference"]), "--management-port", str(ports["management"])]
    cmd += ["--metrics-port", str(ports["metrics"]), "--job-queue-size", str(args.concurrency * 2)]
    cmd += ["--cache-dir", str(args.out / "cache"), "--ready-file", str(out / "ready.json")]
    (out / "ready.json").unlink(missing_ok=True)
    base, mgmt = (f"http://127.0.0.1:{ports[k]}" for k in ("inference", "management"))
    plan = hostile_plan(args.hostile_requests, images)
    log = open(out / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    monitor = Monitor(base, mgmt, ["cnn", "echo", "victim"])
    try:
        ready = wait_ready_file(out / "ready.json", server, 120)
        status, body = _call("POST", f"{mgmt}/models?url=victim.mar&batch_size=1&initial_workers=1")
        if status != 200:
            print(f"could not register the victim: {status} {body[:300]!r}")
            return False
        expected = asyncio.run(expected_answers(base, images))
        monitor.start()
        result = asyncio.run(
            fire_with_attacks(base, ports, plan, args.concurrency, args.poison_every, judge_for(expected))
        )
        monitor.stop_event.set()
        monitor.join(15)
        described = {
            m: json.loads(_call("GET", f"{mgmt}/models/{m}")[1])[0] for m in ("cnn", "echo", "victim")
        }
        server_alive = server.poll() is None
    finally:
        monitor.stop_event.set()
        stop_server(server)
        log.close()
    return report(args, plan, result, monitor, ready, described, server_alive)


def report(args, plan, result, monitor, ready, described, server_alive) -> bool:
    answers = result["answers"]
    statuses = Counter(s for got in answers.values() for s in got)
    lost = [rid for rid, got in answers.items() if not got]
    duplicated = [rid for rid, got in answers.items() if len(got) > 1]
    replaced = {
        m: sorted(ready["workers"][m]) != sorted(w["pid"] for w in described[m]["workers"])
        for m in ("cnn", "echo")
    }
    failed_seen = {f"{m} {s}": n for (m, s), n in monitor.states.items() if s != "READY"}
    ping = sorted(monitor.ping_s)
    checks = {
        "every good request answered 200, its own answer": statuses == Counter({200: len(plan)})
        and not result["problems"],
        "nothing lost or answered twice": not lost and not duplicated,
        "every attack answered as it must be (JSON, 4xx / 403 / poison 500)": not result["attack_problems"],
        "no model ever seen FAILED (or unreachable)": not failed_seen,
        "cnn's and echo's workers never replaced": not any(replaced.values()),
        "/ping always answered within 1 s": bool(ping) and ping[-1] < 1.0 and not monitor.ping_failures,
        "server still running": server_alive,
    }
    by_attack: dict[str, dict[str, int]] = {}
    for (label, status), n in sorted(result["attack_counts"].items(), key=str):
        by_attack.setdefault(label, {})[str(status)] = n
    summary = {
        "good_requests": len(plan),
        "concurrency": args.concurrency,
        "seconds": round(result["seconds"], 1),
        "good_req_per_s": round(len(plan) / result["seconds"], 1),
        "good_statuses": {str(k): v for k, v in statuses.items()},
        "lost": len(lost),
        "duplicated": len(duplicated),
        "wrong": len(result["problems"]),
        "attacks_sent": sum(result["attack_counts"].values()),
        "attacks_by_label_and_status": by_attack,
        "victim_deaths_recorded": len(described["victim"].get("deaths", [])),
        "model_states_seen": {f"{m} {s}": n for (m, s), n in sorted(monitor.states.items())},
        "ping_polls": len(ping),
        "ping_max_ms": round(1000 * ping[-1], 1) if ping else None,
        "ping_p99_ms": round(1000 * ping[int(len(ping) * 0.99) - 1], 1) if ping else None,
        "ping_median_ms": round(1000 * statistics.median(ping), 1) if ping else None,
        "checks": checks,
    }
    (args.out / "hostile" / "hostile.json").write_text(json.dumps(summary, indent=2))
    print("\nhostile phase:")
    print(json.dumps(summary, indent=2))
    attack_problems = Counter(result["attack_problems"])
    for line in [*result["problems"][:10], *monitor.ping_failures[:5]]:
        print("PROBLEM", line)
    for line, n in attack_problems.most_common(20):
        print(f"PROBLEM ({n}x)", line)
    ok = all(checks.values())
    print("HOSTILE PHASE PASSED" if ok else "HOSTILE PHASE FAILED")
    return ok
