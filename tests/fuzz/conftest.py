"""A live ``model-archiver serve`` process for the fuzz suites, and the watch that judges every answer.

The server holds three small real models: ``echo`` (a pure-Python handler that answers every request
with its own payload and never fails on purpose), ``linear`` (a TorchScript ``nn.Linear(4, 2)`` behind
the bare ``BaseHandler``, so the v1, v2 and ``/predictions`` routes compute) and ``spare`` (an echo copy
that the fuzzers may scale, unregister and register again). Because no handler here ever fails on
purpose, any 5xx is the server's own fault: the watch counts every one as a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ECHO_HANDLER = '''
"""Answer each request with its own payload, whatever it is; never fail on purpose."""
import json


def handle(data, context):
    if not data:
        return None
    out = []
    for row in data:
        value = row.get("data", row.get("body"))
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        out.append({"echo": value if isinstance(value, str) else json.dumps(value, sort_keys=True)[:200]})
    return out
'''
BARE_HANDLER = "from handlers import BaseHandler\n\n\nclass H(BaseHandler):\n    pass\n"
SERVED = ("echo", "linear", "spare")  # spare may be scaled, unregistered and registered again
KEPT = ("echo", "linear")  # never touched by a destructive operation: their workers must not change
# What an answer must never show: a traceback or a path inside the interpreter's installation.
LEAKS = ("Traceback (most recent call last)", "site-packages", "/lib/python3", sys.prefix)


def _write_model(root: Path, name: str, handler: str) -> Path:
    folder = root / name
    (folder / "MAR-INF").mkdir(parents=True)
    (folder / "handler.py").write_text(handler)
    manifest = {
        "runtime": "python",
        "model": {"modelName": name, "handler": "handler.py", "modelVersion": "1.0"},
    }
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    return folder


def build_store(root: Path) -> Path:
    """The model store: echo, spare (folder archives) and linear (with a TorchScript model.pt)."""
    import torch

    store = root / "store"
    _write_model(store, "echo", ECHO_HANDLER)
    _write_model(store, "spare", ECHO_HANDLER)
    linear_folder = _write_model(store, "linear", BARE_HANDLER)
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 2).eval()
    torch.jit.save(torch.jit.trace(linear, torch.randn(2, 4)), str(linear_folder / "model.pt"))
    manifest_path = linear_folder / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["serializedFile"] = "model.pt"
    manifest_path.write_text(json.dumps(manifest))
    return store


@dataclass
class FuzzServer:
    """The running server: its process, its three base URLs and the model store it was given."""

    process: subprocess.Popen
    inference: str
    management: str
    metrics: str
    store: Path
    log: Path

    def get_json(self, url: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())

    def describe(self, model: str) -> dict[str, Any]:
        return self.get_json(f"{self.management}/models/{model}")[0]


def start_server(root: Path) -> FuzzServer:
    """``model-archiver serve`` on free loopback ports with the three models; returns once it is ready."""
    store = build_store(root)
    ready_file, log = root / "ready.json", root / "serve.log"
    cmd = [sys.executable, "-m", "archiver", "serve", "--model-store", str(store)]
    cmd += ["--models", ",".join(f"{m}={m}" for m in SERVED), "--batch-size", "4", "--max-batch-delay", "2"]
    cmd += ["--port", "0", "--management-port", "0", "--metrics-port", "0", "--response-timeout", "30"]
    cmd += ["--ready-file", str(ready_file), "--cache-dir", str(root / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MODEL_ARCHIVER_TOKEN": ""}
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while not ready_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    ready = json.loads(ready_file.read_text())
    urls = {k: f"http://127.0.0.1:{ready[f'{k}_port']}" for k in ("inference", "management", "metrics")}
    return FuzzServer(process, store=store, log=log, **urls)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: a front frozen by an attack must not outlive the test."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(20)


@dataclass
class Watch:
    """Judges every answer and polls ``/ping`` from a thread while the fuzzing runs.

    An answer fails when it is a 5xx, when a 4xx/5xx has no JSON ``{"code", "type", "message"}`` body
    (or one whose code is not the status), when it quotes a traceback or the interpreter's paths, or
    when no answer came at all. ``/ping`` fails when one poll takes a second or more.
    """

    server: FuzzServer
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)  # "operation: status type" -> count
    examples: dict[str, str] = field(default_factory=dict)  # the first request and answer of each kind
    ping_max_s: float = 0.0
    ping_slow: list[str] = field(default_factory=list)
    pings: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _workers_before: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> Watch:
        self._workers_before = worker_snapshot(self.server)
        self._thread = threading.Thread(target=self._poll_ping, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    @property
    def server_stuck(self) -> bool:
        """The front stopped answering /ping (or exited): further requests would only time out."""
        return self.server.process.poll() is not None or any("no answer" in s for s in self.ping_slow[-3:])

    def _poll_ping(self) -> None:
        while not self._stop.wait(0.1):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.server.inference + "/ping", timeout=10) as resp:
                    resp.read()
                    outcome = str(resp.status)
            except urllib.error.HTTPError as err:
                outcome = str(err.code)
            except OSError as exc:
                outcome = f"no answer ({type(exc).__name__})"
            took = time.perf_counter() - started
            with self._lock:
                self.pings += 1
                self.ping_max_s = max(self.ping_max_s, took)
                # 503 is /ping's answer while a model loads (a register in flight): an answer still.
                if took >= 1.0 or outcome not in ("200", "503"):
                    self.ping_slow.append(f"/ping {outcome} after {took:.2f} s")

    def judge(self, label: str, what: str, status: int | None, headers: Any, body: bytes) -> None:
        """Count one answer to ``what`` (an operation's ``label``; ``status`` None: no answer came).

        Errors are ``{"code", "type", "message"}``; the Open Inference Protocol's routes (``/v1/``,
        ``/v2/``) answer their own errors in its shape, ``{"error": "..."}`` (the site check and the
        HTTP parser, which answer before any route, keep ours).
        """
        path = label.split(" ", 1)[-1]
        problem = _problem(status, headers, body, oip=path.startswith(("/v1/", "/v2")))
        with self._lock:
            self.statuses[status if status is not None else "no answer"] += 1
            if problem:
                self.failures.append(f"{what} -> {problem}")
                kind = f"{label}: {_kind(status, body)}"
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                self.examples.setdefault(kind, f"{what} -> {problem}")

    def unexpected(self, what: str, status: int, body: bytes) -> None:
        """An answer the request's own rule does not allow (a 200 for a refused value, not 403 for a
        cross-site request), though it passed the general rules."""
        with self._lock:
            self.failures.append(f"{what} -> {status}, not what it must get: {body[:300]!r}")
            kind = f"{what.split(':')[0]}: {status} where refused"
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.examples.setdefault(kind, f"{what} -> {status}: {body[:300]!r}")

    def report(self) -> list[str]:
        """Each kind of failure once, with its count and its first example, most frequent first."""
        ordered = sorted(self.kinds.items(), key=lambda kv: -kv[1])
        return [f"[{count}x] {kind}\n      e.g. {self.examples[kind][:700]}" for kind, count in ordered]

    def worker_problems(self) -> list[str]:
        """Worker deaths since the watch started, and any change to the kept models' workers."""
        if self.server.process.poll() is not None:
            return [f"the server exited with {self.server.process.returncode}"]
        return worker_problems(self._workers_before, worker_snapshot(self.server))

    def total(self) -> int:
        return sum(self.statuses.values())

    def summary(self, title: str, seconds: float) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0])))
        return (
            f"{title}: {self.total()} requests in {seconds:.1f} s ({counts}); /ping polled {self.pings} "
            f"times, slowest {self.ping_max_s:.3f} s; {len(self.failures)} failing answers"
        )


def _kind(status: int | None, body: bytes) -> str:
    """A failure's kind, to group the report: the status and the error type the body names."""
    if status is None:
        return "no answer"
    try:
        payload = json.loads(body)
        error_type = payload.get("type") or ("{error}" if "error" in payload else "?")
    except (ValueError, AttributeError):
        error_type = "body not JSON"
    return f"{status} {error_type}"


def _problem(status: int | None, headers: Any, body: bytes, oip: bool = False) -> str | None:
    if status is None:
        return "no answer: " + body.decode("utf-8", "replace")[:200]
    text = body[:4000].decode("utf-8", "replace")
    leaks = [leak for leak in LEAKS if leak and leak in text]
    # 501 is a declared answer, not a failure: /explanations to a model whose handler cannot explain
    declined = status == 501 and " cannot explain: " in text  # its type (v1's {"error"} has none) or text
    if status >= 500 and not declined:
        return f"{status} from the server itself: {text[:300]}"
    if status < 400:
        return f"{status} quoting {leaks}: {text[:300]}" if leaks else None
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip()
    try:
        payload = json.loads(body)
    except ValueError:
        return f"{status} with a {content_type or 'untyped'} body that is not JSON: {text[:200]!r}"
    if content_type != "application/json":
        return f"{status} as {content_type!r}: {text[:200]}"
    if oip and isinstance(payload, dict) and set(payload) == {"error"}:
        if not isinstance(payload["error"], str):
            return f"{status} whose protocol error is not a string: {text[:200]}"
    elif not isinstance(payload, dict) or set(payload) != {"code", "type", "message"}:
        return f"{status} whose JSON is not {{code, type, message}}: {text[:200]}"
    elif payload["code"] != status:
        return f"{status} answered with code {payload['code']}: {text[:200]}"
    if leaks:
        return f"{status} quoting {leaks}: {text[:300]}"
    return None


def worker_snapshot(server: FuzzServer) -> dict[str, Any]:
    """For each kept model: its state, its worker pids; for every model: the deaths its pool recorded."""
    snapshot: dict[str, Any] = {}
    for model in SERVED:
        try:
            described = server.describe(model)
        except (OSError, ValueError) as exc:
            snapshot[model] = {"error": repr(exc)}
            continue
        snapshot[model] = {
            "status": described["status"],
            "pids": sorted(w.get("pid") for w in described["workers"]) if model in KEPT else None,
            "deaths": described.get("deaths", []),
        }
    return snapshot


def worker_problems(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Worker deaths anywhere, and any change to the kept models' workers or state."""
    problems = []
    for model in SERVED:
        now = after[model]
        if "error" in now:
            if model in KEPT:
                problems.append(f"{model}: cannot be described after the run ({now['error']})")
            continue
        for death in now["deaths"]:
            if death not in before[model].get("deaths", []):
                problems.append(f"{model}: a worker died: {death}")
        if model in KEPT and (now["status"], now["pids"]) != (before[model]["status"], before[model]["pids"]):
            problems.append(f"{model}: {before[model]} before, {now} after")
    return problems


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    """A live server for one fuzz module, stopped (killed if frozen) at the module's end."""
    server = start_server(tmp_path_factory.mktemp("fuzz"))
    yield server
    stop_server(server.process)


@pytest.fixture
def watch(fuzz_server: FuzzServer) -> Iterator[Watch]:
    """A started Watch over the module's server (the /ping poller stops at the test's end)."""
    with Watch(fuzz_server) as started:
        yield started
