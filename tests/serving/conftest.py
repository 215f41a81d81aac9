"""Helpers for the serving tests: small real models in folder archives, a live server, plain HTTP calls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from archiver.serving.front.server import ServerSettings, ServerThread
from archiver.serving.supervisor.registry import ModelSettings

# A pure-Python handler whose behaviour the request body chooses, so one model can play every role:
# "raise" fails the batch, "hang" never answers, "wrong" returns no answers, "sleep:S" works S seconds,
# "bad…" is rejected alone (HandlerInputError), anything else is echoed with the batch size it rode in.
ECHO_HANDLER = """
import json
import os
import time

from handlers import HandlerInputError

TAG = "{tag}"


def handle(data, context):
    if not data:
        return None
    texts = []
    for row in data:
        value = row.get("data", row.get("body"))
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        texts.append(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    if "raise" in texts:
        raise RuntimeError("boom: the handler failed")
    if "hang" in texts:
        time.sleep(30)
    if "wrong" in texts:
        return []
    for text in texts:
        if text.startswith("sleep:"):
            time.sleep(float(text.split(":")[1]))
    return [
        HandlerInputError(f"cannot use {{text!r}}") if text.startswith("bad")
        else {{"echo": text, "batch": len(data), "tag": TAG}}
        for text in texts
    ]
"""


def write_model(
    root: Path,
    name: str,
    *,
    handler_source: str | None = None,
    handler_file: str = "handler.py",
    version: str = "1.0",
    config_yaml: str | None = None,
    tag: str = "",
) -> Path:
    """A folder archive (MAR-INF/MANIFEST.json + handler), which every part of the project accepts."""
    folder = root / name
    (folder / "MAR-INF").mkdir(parents=True)
    source = handler_source if handler_source is not None else ECHO_HANDLER.format(tag=tag or name)
    (folder / handler_file).write_text(textwrap.dedent(source))
    model: dict[str, Any] = {"modelName": name, "handler": handler_file, "modelVersion": version}
    if config_yaml is not None:
        (folder / "model-config.yaml").write_text(config_yaml)
        model["configFile"] = "model-config.yaml"
    manifest = {"runtime": "python", "model": model}
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    return folder


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Reply:
    """One HTTP call with a timeout; error statuses are returned, not raised."""
    data = body.encode() if isinstance(body, str) else body
    headers = dict(headers or {})
    if data is not None and not any(k.lower() == "content-type" for k in headers):
        # urllib would say form-urlencoded; a raw upload (curl -T) says nothing more specific than bytes.
        headers["Content-Type"] = "application/octet-stream"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Reply(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, dict(err.headers), err.read())


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def raw_exchange(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port; return the first response (or what came before the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    key, _, value = line.partition(b":")
                    if key.strip().lower() == b"content-length":
                        length = int(value)
                if len(body) >= length:
                    return data


@pytest.fixture
def serve(tmp_path: Path):
    """Start a live in-process server on free loopback ports; every one is stopped at teardown."""
    started: list[ServerThread] = []

    def start(
        models: list[Path] | list[tuple[str | None, Path]] = (),
        *,
        defaults: ModelSettings | None = None,
        **settings: Any,
    ) -> ServerThread:
        pairs = [m if isinstance(m, tuple) else (None, m) for m in models]
        server_settings = ServerSettings(
            port=0,
            management_port=0,
            metrics_port=0,
            models=pairs,
            defaults=defaults or ModelSettings(),
            cache_dir=tmp_path / "cache",
            **settings,
        )
        thread = ServerThread(server_settings)
        started.append(thread)
        return thread.start()

    yield start
    for thread in started:
        thread.stop()


@pytest.fixture
def echo_model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "models", "echo")


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """write_model into this test's models folder: make_model("name", handler_source=..., ...)."""
    return lambda name, **kw: write_model(tmp_path / "models", name, **kw)


@pytest.fixture
def call() -> Callable[..., Reply]:
    """http(method, url, body=None, headers=None, timeout=30) -> Reply(status, headers, body)."""
    return http


@pytest.fixture
def poll() -> Callable[..., Any]:
    """wait_until(check, timeout=30, what=...): poll with a deadline instead of sleeping."""
    return wait_until


def describe_model(call: Callable[..., Reply], server: Any, model: str) -> dict:
    """GET /models/{model} on the management port: the first (only) version's description."""
    reply = call("GET", f"{server.url('management')}/models/{model}", timeout=10)
    assert reply.status == 200, reply.body
    return reply.json()[0]


def cause_counts(call: Callable[..., Reply], server: Any, metric: str, model: str) -> dict[str, float]:
    """{cause: count} of one model's worker deaths or restarts (``metric``) on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = call("GET", server.url("metrics") + "/metrics", timeout=10).body.decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return {s.labels["cause"]: s.value for s in samples if s.name == metric and s.labels["model"] == model}


@pytest.fixture
def describe() -> Callable[..., dict]:
    """describe_model(call, server, model): a model's description from the management API."""
    return describe_model


@pytest.fixture
def counted() -> Callable[..., dict[str, float]]:
    """cause_counts(call, server, metric, model): a model's deaths or restarts on /metrics, by cause."""
    return cause_counts


@pytest.fixture
def raw() -> Callable[..., bytes]:
    """raw_exchange(port, payload): bytes on a bare socket, for requests no client library would send."""
    return raw_exchange


# ---- misbehaving handlers, for the worker-process tests ------------------------------------------

# A class handler whose behaviour the request body chooses, so one cheap model can play every failure:
# "segv", "abort", "exit3" end the worker process; "sysexit" calls sys.exit(7); "loop" never returns;
# "sleep:S" works S seconds; "grow:MB" holds MB more megabytes (4 MB at a time, then waits);
# "print:MB" writes MB megabytes to stdout and as many to stderr; "initcrash:KIND" (or
# "initcrash:KIND:once") leaves a marker that makes initialize crash the same way (segv, abort or
# exit) on every start (or on the next one only), then crashes; anything else is echoed with the
# worker's pid. Every request of a batch is acted on in turn.
CRASHY_HANDLER = """
import ctypes
import os
import resource
import sys
import time
from pathlib import Path

MARKER = Path({marker!r})


def crash(kind):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files in the server's folder
    print("crashing: " + kind, file=sys.stderr, flush=True)
    if kind == "segv":
        ctypes.string_at(0)
    if kind == "abort":
        os.abort()
    os._exit(3)


class CrashyHandler:
    def initialize(self, context):
        if MARKER.exists():
            kind, _, times = MARKER.read_text().partition(":")
            if times == "once":
                MARKER.unlink()
            crash(kind)

    def handle(self, data, context):
        texts = [row.get("data", row.get("body")) for row in data]
        texts = [t.decode() if isinstance(t, (bytes, bytearray)) else str(t) for t in texts]
        for text in texts:
            self.act(*text.partition(":")[::2])
        return [{{"echo": text, "pid": os.getpid()}} for text in texts]

    def act(self, command, arg):
        if command in ("segv", "abort"):
            crash(command)
        if command == "exit3":
            crash("exit")
        if command == "sysexit":
            sys.exit(7)
        if command == "loop":
            while True:
                pass
        if command == "sleep":
            time.sleep(float(arg))
        if command == "grow":
            hog = []
            while len(hog) * 4 < int(arg):
                hog.append(b"\\x01" * (4 << 20))
                time.sleep(0.005)
            time.sleep(30)
        if command == "print":
            line = "x" * 1023
            for _ in range(int(arg) * 1024):
                print(line)
                print(line, file=sys.stderr)
        if command == "initcrash":
            MARKER.write_text(arg)
            crash(arg.partition(":")[0])
"""


def write_crashy_model(root: Path, name: str, **kw: Any) -> tuple[Path, Path]:
    """(a folder archive in root/models running CRASHY_HANDLER, the marker file its initialize reads)."""
    marker = root / f"{name}.initcrash"
    source = CRASHY_HANDLER.format(marker=str(marker))
    return write_model(root / "models", name, handler_source=source, **kw), marker


@pytest.fixture
def crashy_model(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """crashy_model("name", config_yaml=...) -> (folder archive running CRASHY_HANDLER, its marker file)."""
    return lambda name, **kw: write_crashy_model(tmp_path, name, **kw)


class BackgroundLoad:
    """POSTs to one URL back to back from a few threads until stopped; every status is kept."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.statuses: list[int | str] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def __enter__(self) -> BackgroundLoad:
        for thread in self._threads:
            if not thread.is_alive() and not self._stop.is_set():
                thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            body = f"load {n}.{i}"
            try:
                reply = http("POST", self.url, body, timeout=30)
                status: int | str = reply.status
                wrong = reply.status != 200 or reply.json().get("echo") != body
                detail = f"{reply.status} {reply.body[:300]!r}"
            except OSError as exc:
                status, wrong, detail = repr(exc), True, repr(exc)
            with self._lock:
                self.statuses.append(status)
                if wrong:
                    self.failures.append(detail)
            i += 1

    def answered(self) -> int:
        with self._lock:
            return len(self.statuses)

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` more requests have been answered (proof the load goes on)."""
        goal = self.answered() + count
        wait_until(lambda: self.answered() >= goal, timeout, f"{count} more answers under load")


@pytest.fixture
def background_load() -> Callable[..., BackgroundLoad]:
    """background_load(url, threads=2): a started BackgroundLoad (use it as a context manager)."""
    loads: list[BackgroundLoad] = []

    def start(url: str, threads: int = 2) -> BackgroundLoad:
        load = BackgroundLoad(url, threads)
        loads.append(load)
        return load.__enter__()

    yield start
    for load in loads:
        load.stop()


@pytest.fixture(scope="session")
def serving_kit() -> SimpleNamespace:
    """The helpers above, for module-scoped fixtures (``--import-mode=importlib`` forbids importing
    conftest): write_model, write_crashy_model, http, wait_until, BackgroundLoad."""
    return SimpleNamespace(
        write_model=write_model,
        write_crashy_model=write_crashy_model,
        http=http,
        wait_until=wait_until,
        BackgroundLoad=BackgroundLoad,
    )


CLI = [sys.executable, "-m", "archiver"]


def cli_env() -> dict[str, str]:
    """The environment tests run the CLI in: one torch thread, no token from the caller's shell."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MODEL_ARCHIVER_TOKEN": ""}


@pytest.fixture
def serve_process(tmp_path):
    """``model-archiver serve ARGS --port 0 ...`` as a real process, its output in a log file (so it
    never blocks on a pipe). ``start(*args)`` returns (process, ready JSON) once every startup model is
    loaded; ``start(*args, ready=False)`` returns (process, {"inference": url, "management": url}) as
    soon as it prints its addresses, before any model loads. Every process is stopped at teardown."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, ready: bool = True, env: dict[str, str] | None = None):
        n = len(procs)
        ready_file, log_path = tmp_path / f"ready-{n}.json", tmp_path / f"serve-{n}.log"
        cmd = [*CLI, "serve", *args, "--port", "0", "--management-port", "0", "--metrics-port", "0"]
        cmd += ["--ready-file", str(ready_file), "--cache-dir", str(tmp_path / "cache")]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or cli_env())
        proc.log = log_path  # type: ignore[attr-defined]
        procs.append(proc)
        if ready:
            wait_until(lambda: ready_file.exists() or proc.poll() is not None, 60, "server ready")
            assert proc.poll() is None, log_path.read_text()
            return proc, json.loads(ready_file.read_text())
        first = wait_until(lambda: _address_line(log_path) or proc.poll() is not None, 60, "server addresses")
        assert proc.poll() is None, log_path.read_text()
        words = first.split()
        return proc, {"inference": words[3], "management": words[5]}

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def _address_line(log: Path) -> str | None:
    lines = log.read_text().splitlines()
    return next((line for line in lines if line.startswith("model-archiver serve: inference ")), None)
