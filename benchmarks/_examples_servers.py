"""Run one TorchServe example on one server: build the archive with the README's command line, start
TorchServe 0.12 or ours on free ports, load the model, send the README's requests, always stop.

Every HTTP call has a timeout (TorchServe keeps a request open forever when its workers fail), every
server is stopped in a ``finally``: TorchServe by ``torchserve --stop`` with its own TMPDIR (its pid file
lives there, so other TorchServes on the machine are left alone), ours by SIGTERM to its process.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.client
import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _common import REPO, free_port, kill_leftovers, stop_server
from _examples_specs import Example, Request

TS_VENV = REPO / ".venv-ts"
OUR_BIN = REPO / ".venv" / "bin" / "model-archiver"
TS_ARCHIVER = TS_VENV / "bin" / "torch-model-archiver"


@dataclass
class Answer:
    status: int | None  # None: no answer within the timeout (or no connection)
    body: str
    headers: dict[str, str] = field(default_factory=dict)

    def short(self, limit: int = 70) -> str:
        text = " ".join(self.body.split())
        return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class SideResult:
    loaded: bool
    answers: list[Answer]
    error: str = ""
    same: bool | None = None  # answers agree with TorchServe's (None: this is TorchServe's run)
    differs: str = ""  # how they differ, when they do

    @property
    def ok(self) -> bool:
        return bool(self.answers) and all(a.status == 200 for a in self.answers)


def difference(ours: Answer, theirs: Answer) -> str:
    """How ours differs from TorchServe's answer ("" when it agrees): JSON of the same shape with
    numbers within float noise, the same text, or (Prometheus text) every metric name TorchServe's has."""
    if ours.status != theirs.status:
        return f"status {ours.status}, TorchServe {theirs.status}"
    if theirs.body.startswith("# HELP") or "\n# TYPE" in theirs.body:
        missing = sorted(_metric_names(theirs.body) - _metric_names(ours.body))
        return f"metrics missing: {', '.join(missing)}" if missing else ""
    try:
        differ, compared = _unlike(json.loads(ours.body), json.loads(theirs.body))
    except ValueError:
        differ, compared = int(" ".join(ours.body.split()) != " ".join(theirs.body.split())), 1
    if not differ:
        return ""
    if compared > 10:
        return f"{differ} of {compared} values differ"
    return f"answer {ours.short(40)!r}, TorchServe {theirs.short(40)!r}"


def _unlike(a: object, b: object) -> tuple[int, int]:
    """(values that differ, values compared) between two JSON documents of the same structure."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return 1, 1
        pairs = [_unlike(a[k], b[k]) for k in a]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return 1, 1
        pairs = [_unlike(x, y) for x, y in zip(a, b, strict=True)]
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return int(abs(a - b) > 1e-3 + 1e-2 * abs(b)), 1
    else:
        return int(a != b), 1
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def _metric_names(text: str) -> set[str]:
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}


def build_archive(example: Example, checkout: Path, archiver: Path, out: Path) -> Path:
    """The README's archiver command (program name ``archiver``) run in the example's cwd; the archive
    moved to ``out``. RuntimeError with the tool's last lines when it fails."""
    cwd = checkout / example.cwd
    target = cwd / example.mar
    target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)  # --export-path model_store: the README's mkdir
    done = subprocess.run(
        [str(archiver), *shlex.split(example.archive)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0 or not target.is_file():
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise RuntimeError(f"{archiver.name} exit {done.returncode}: {tail[:300]}")
    out.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(str(target), out / target.name))


def _properties(example: Example, checkout: Path, ports: dict[str, int], torchserve: bool) -> str:
    """The example's config.properties (or none) with this run's addresses appended: in a Java
    properties file the last value of a key wins."""
    text = ""
    if example.ts_config:
        text = (checkout / example.cwd / example.ts_config).read_text()
    # Free gRPC ports for both: the stateful example's own values (http://127.0.0.1:7070) are not
    # port numbers, and TorchServe's Integer.parseInt fails on them as our reader does.
    lines = [
        f"inference_address=http://127.0.0.1:{ports['inference']}",
        f"management_address=http://127.0.0.1:{ports['management']}",
        f"metrics_address=http://127.0.0.1:{ports['metrics']}",
        f"grpc_inference_port={free_port()}",
        f"grpc_management_port={free_port()}",
    ]
    if torchserve:
        lines += [
            f"python={TS_VENV / 'bin' / 'python'}",
            "disable_token_authorization=true",
        ]
    return text.rstrip("\\\n") + "\n" + "\n".join(lines) + "\n"


def _env(home: Path, torch_home: Path, torchserve: bool) -> dict[str, str]:
    env = {**os.environ, "TORCH_HOME": str(torch_home), "TMPDIR": str(home / "tmp")}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    if torchserve:
        env["PATH"] = f"{TS_VENV / 'bin'}:{env['PATH']}"
        env["TS_DISABLE_SYSTEM_METRICS"] = "true"
    return env


def _torchserve_pids(home: Path) -> list[psutil.Process]:
    """TorchServe's Java frontend started from ``home``'s TMPDIR, with its workers."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        with contextlib.suppress(psutil.Error):
            java = any("org.pytorch.serve.ModelServer" in c for c in proc.info["cmdline"] or [])
            if java and (proc.info["environ"] or {}).get("TMPDIR") == str(home / "tmp"):
                found += [proc, *proc.children(recursive=True)]
    return found


@contextlib.contextmanager
def torchserve(example: Example, checkout: Path, store: Path, home: Path, torch_home: Path) -> Iterator[dict]:
    """TorchServe 0.12 started as the README starts it, on free ports; yields the ports; stops it."""
    ports = {name: free_port() for name in ("inference", "management", "metrics")}
    config = home / "config.properties"
    config.write_text(_properties(example, checkout, ports, torchserve=True))
    env = _env(home, torch_home, torchserve=True)
    cmd = [
        str(TS_VENV / "bin" / "torchserve"),
        "--start",
        "--ncs",
        "--disable-token-auth",
        "--enable-model-api",
    ]
    cmd += ["--model-store", str(store), "--ts-config", str(config)]
    if example.models:
        cmd += ["--models", example.models]
    try:
        with open(home / "start.log", "w") as log:  # Java keeps the launcher's stdout: never a pipe
            subprocess.run(cmd, cwd=checkout / example.cwd, env=env, stdout=log, stderr=log, timeout=120)
        yield ports
    finally:
        tree = _torchserve_pids(home)
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [str(TS_VENV / "bin" / "torchserve"), "--stop"],
                cwd=checkout / example.cwd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
            )
        kill_leftovers(tree, grace_s=20)


def our_serve_flags() -> set[str]:
    """The flags this checkout's ``serve`` takes (``--ts-config`` arrives with issue 24)."""
    done = subprocess.run([str(OUR_BIN), "serve", "--help"], capture_output=True, text=True, timeout=60)
    return {word.rstrip(",") for word in done.stdout.split() if word.startswith("--")}


@contextlib.contextmanager
def ours(example: Example, checkout: Path, store: Path, home: Path, torch_home: Path) -> Iterator[dict]:
    """Our server started with the README's serving arguments, on free ports; yields the ports."""
    ports = {name: free_port() for name in ("inference", "management", "metrics")}
    cmd = [str(OUR_BIN), "serve", "--model-store", str(store), "--port", str(ports["inference"])]
    cmd += ["--management-port", str(ports["management"]), "--metrics-port", str(ports["metrics"])]
    cmd += ["--cache-dir", str(home / "cache"), "--ready-file", str(home / "ready.json")]
    flags = our_serve_flags()
    for flag in ("--grpc-port", "--grpc-management-port"):  # off: their fixed defaults collide
        cmd += [flag, "off"] if flag in flags else []
    if example.ts_config and "--ts-config" in flags:
        config = home / "config.properties"
        config.write_text(_properties(example, checkout, ports, torchserve=False))
        cmd += ["--ts-config", str(config)]
    if example.models:
        cmd += ["--models", example.models]
    log = open(home / "serve.log", "w")  # noqa: SIM115 - closed in the finally
    proc = subprocess.Popen(
        cmd, cwd=checkout / example.cwd, env=_env(home, torch_home, False), stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 120
        while not (home / "ready.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}: {_tail(home / 'serve.log')}")
        yield ports
    finally:
        stop_server(proc, grace_s=30)
        log.close()


def _tail(path: Path, lines: int = 2) -> str:
    with contextlib.suppress(OSError):
        return " ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[:300]
    return ""


def call(method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float) -> Answer:
    """One call as curl makes it: ``curl -T`` sends no Content-Type (urllib would add a form's)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers)
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return Answer(resp.status, resp.read(64 << 20).decode(errors="replace"), headers)
    except (OSError, http.client.HTTPException) as exc:
        return Answer(None, f"no answer: {exc}")
    finally:
        conn.close()


def wait_loaded(example: Example, ports: dict, timeout: float) -> bool:
    """The model registered (the README's management call) or READY (loaded by --models)."""
    base = f"http://127.0.0.1:{ports['management']}"
    deadline = time.monotonic() + timeout
    # torchserve --start returns before its frontend listens: wait for the management API first.
    while call("GET", f"{base}/models", None, {}, 5).status != 200 and time.monotonic() < deadline:
        time.sleep(1)
    if example.register:
        answer = call("POST", f"{base}/models?{example.register}", None, {}, timeout)
        return answer.status == 200
    name = (example.models or "").split("=")[0].removesuffix(".mar")
    while time.monotonic() < deadline:
        answer = call("GET", f"{base}/models/{name}", None, {}, 5)
        if answer.status == 200 and '"READY"' in answer.body.replace(" ", ""):
            return True
        time.sleep(1)
    return False


def _body(request: Request, cwd: Path) -> bytes | None:
    if request.client_batch:
        frame = base64.b64encode((cwd / request.file).read_bytes()).decode()
        return json.dumps({str(i): frame for i in range(request.client_batch)}).encode()
    if request.file is not None:
        return (cwd / request.file).read_bytes()
    return request.data


def send_requests(example: Example, checkout: Path, ports: dict, timeout: float) -> list[Answer]:
    """The README's requests: in order, or all at once where the README sends them with ``&``."""
    cwd = checkout / example.cwd

    answers: list[Answer] = []

    def one(request: Request) -> Answer:
        url = f"http://127.0.0.1:{ports[request.port]}{request.path}"
        headers = {k: _answered_header(v, k, answers) for k, v in request.headers}
        return call(request.method, url, _body(request, cwd), headers, timeout)

    if example.register:  # resnet_152_batch: the README's three curl ... &
        with concurrent.futures.ThreadPoolExecutor(len(example.requests)) as pool:
            return list(pool.map(one, example.requests))
    for request in example.requests:
        answers.append(one(request))
    return answers


def _answered_header(value: str, name: str, answers: list[Answer]) -> str:
    """``@N``: header ``name`` of the answer to request N (a sequence id the server made), else ``value``."""
    if value.startswith("@") and value[1:].isdigit() and int(value[1:]) < len(answers):
        return answers[int(value[1:])].headers.get(name.lower(), "")
    return value


def run_side(server, example: Example, checkout: Path, mar: Path, home: Path, torch_home: Path) -> SideResult:
    """Serve ``mar`` with ``server`` (``torchserve`` or ``ours``) and send the example's requests."""
    shutil.rmtree(home, ignore_errors=True)
    store = home / "model_store"
    store.mkdir(parents=True)
    shutil.copy(mar, store / mar.name)
    limit = 900 if example.slow else 150
    try:
        with server(example, checkout, store, home, torch_home) as ports:
            loaded = wait_loaded(example, ports, limit)
            answers = send_requests(example, checkout, ports, limit if loaded else 20)
            return SideResult(loaded, answers)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return SideResult(False, [], str(exc)[:300])
