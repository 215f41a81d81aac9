"""Fixtures for the engine tests: real archives (the seed's ResNet34, a built-in-handler CNN, an echo
model in two versions) and real engines (Ray Serve through ``serve run``, KServe's ModelServer) on free
loopback ports, each stopped at teardown with every process it started."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "examples" / "resnet34"
VENV_BIN = Path(sys.executable).parent
# Every process an engine fixture starts carries this variable (Ray's raylet passes its environment to
# its workers), so teardown can find and end exactly those processes and no one else's.
ENGINE_MARK = "ARCHIVER_ENGINE_TEST_RUN"

ECHO_HANDLER = """
import json


def handle(data, context):
    if not data:
        return None
    answers = []
    for row in data:
        value = row.get("data", row.get("body"))
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        text = value if isinstance(value, str) else json.dumps(value)
        answers.append({"echo": text, "version": "%s", "batch": len(data)})
    return answers
"""

ECHO_SIGNATURE = """signature:
  inputs: [{name: text, datatype: BYTES, shape: [-1]}]
  outputs: [{name: output-0, datatype: BYTES, shape: [-1]}]
"""
ECHO_INPUTS = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]


# ---- HTTP --------------------------------------------------------------------------------------------
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
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> Reply:
    """One HTTP call; error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    check: Any,
    timeout_s: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> Any:
    """Poll ``check`` until truthy; fail (with the engine's log) after ``timeout_s`` or if ``proc`` ends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out waiting for {what} (process exit: {proc.poll() if proc else None})\n{tail}")


def _answers(url: str) -> bool:
    try:
        return http("GET", url, timeout=3).status == 200
    except OSError:
        return False


# ---- archives ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def seed_archive(tmp_path_factory) -> Path:
    """The seed walkthrough's archive: ResNet34 (random weights) traced by examples/resnet34/export.py,
    the custom MyHandler, index_to_name.json; built with the seed's own command line."""
    work = tmp_path_factory.mktemp("seed")
    for name in ("MyHandler.py", "my_handler.py", "index_to_name.json"):
        shutil.copy(SEED / name, work / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    export = [sys.executable, str(SEED / "export.py")]
    subprocess.run(export, cwd=work, env=env, check=True, capture_output=True)
    subprocess.run(
        [
            str(VENV_BIN / "model-archiver"),
            *["--model-name", "resnet34", "--version", "1.0", "--serialized-file", "resnet34.pt"],
            *["--extra-files", "./index_to_name.json,./MyHandler.py", "--handler", "my_handler.py"],
            *["--export-path", "model-store", "-f"],
        ],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
    )
    return work / "model-store" / "resnet34.mar"


@pytest.fixture(scope="session")
def seed_labels() -> dict[str, list[str]]:
    return json.loads((SEED / "index_to_name.json").read_text())


@pytest.fixture(scope="session")
def classifier_archive(tmp_path_factory) -> Path:
    """A tiny CNN behind the built-in image_classifier handler, as a .mar."""
    import torch

    from archiver.build import build_archive
    from archiver.export import export_model

    work = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=8),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 6),
    )
    export_model(model, torch.rand(1, 3, 224, 224), work / "cnn.pt")
    (work / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(6)}))
    return build_archive(
        model_name="cnn",
        version="1.0",
        handler="image_classifier",
        serialized_file=str(work / "cnn.pt"),
        extra_files=str(work / "index_to_name.json"),
        export_path=str(work / "store"),
    )


@pytest.fixture(scope="session")
def tensor_archive(tmp_path_factory) -> Path:
    """A TorchScript model (x * 2 + 1) behind a bare BaseHandler subclass: tensors in, tensors out."""
    import warnings

    import torch

    from archiver.build import build_archive

    class Doubler(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 + 1

    work = tmp_path_factory.mktemp("tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.save(torch.jit.trace(Doubler().eval(), torch.rand(1, 4)), str(work / "model.pt"))
    (work / "bare.py").write_text("from handlers import BaseHandler\n\n\nclass H(BaseHandler):\n    pass\n")
    # Batches of up to 8 rows; on Ray no CPU reserved (the machine's two are ResNet's).
    (work / "model-config.yaml").write_text("batchSize: 8\nray:\n  ray_actor_options: {num_cpus: 0}\n")
    return build_archive(
        model_name="doubler",
        version="1.0",
        handler=str(work / "bare.py"),
        serialized_file=str(work / "model.pt"),
        config_file=str(work / "model-config.yaml"),
        export_path=str(work / "store"),
    )


def write_echo(root: Path, version: str, config_yaml: str | None = None) -> Path:
    """A folder archive ``echo`` (version ``version``) that echoes its input with its version."""
    folder = root / f"echo-{version}"
    (folder / "MAR-INF").mkdir(parents=True)
    (folder / "handler.py").write_text(ECHO_HANDLER % version)
    model: dict[str, Any] = {"modelName": "echo", "handler": "handler.py", "modelVersion": version}
    if config_yaml is not None:
        (folder / "model-config.yaml").write_text(config_yaml)
        model["configFile"] = "model-config.yaml"
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"runtime": "python", "model": model}))
    return folder


@pytest.fixture(scope="session")
def echo_archives(tmp_path_factory) -> list[Path]:
    """echo 1.0 and 2.0; their model-config.yaml ask Ray for no CPU (the machine has two, for ResNet)
    and declare a v2 signature."""
    root = tmp_path_factory.mktemp("echo")
    config = "batchSize: 4\nmaxBatchDelay: 20\nray:\n  ray_actor_options:\n    num_cpus: 0\n" + ECHO_SIGNATURE
    return [write_echo(root, "1.0", config), write_echo(root, "2.0", config)]


# ---- engines ---------------------------------------------------------------------------------------------
def marked_processes(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(ENGINE_MARK) == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Engine:
    """A started engine process: its URL, its log, and the marker its processes carry."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path, mark: str) -> None:
        self.proc, self.url, self.log, self.mark = proc, url, log, mark

    def processes(self) -> list[psutil.Process]:
        return marked_processes(self.mark)

    def stop(self, grace_s: float = 60) -> list[str]:
        """SIGINT (what Ctrl-C sends; ``serve run`` then shuts Ray down), then end what is left of
        ours. Returns what had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        deadline = time.monotonic() + 20
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.25)
        killed = []
        for proc in left:
            with contextlib.suppress(psutil.Error):
                killed.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
                proc.kill()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return killed


def engine_env(tmp: Path, mark: str) -> dict[str, str]:
    env = {**os.environ, ENGINE_MARK: mark, "MODEL_ARCHIVER_CACHE": str(tmp / "cache")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)  # a local Ray of our own, never someone else's cluster
    return env


def start_ray(tmp: Path, config: dict[str, Any], timeout_s: float = 300, wait: bool = True) -> Engine:
    """``serve run config.yaml`` (a local Ray of its own), answering once every application is up
    (``wait=False``: at once, for a test that watches an application fail)."""
    import yaml

    port = free_port()
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port}, **config}
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    mark = uuid.uuid4().hex
    log = tmp / "serve-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "serve"), "run", str(path)],
            cwd=tmp,
            env=engine_env(tmp, mark),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    engine = Engine(proc, f"http://127.0.0.1:{port}", log, mark)
    if not wait:
        return engine
    try:
        for app in config["applications"]:
            prefix = app.get("route_prefix", "/").rstrip("/")
            ping = engine.url + prefix + "/ping"
            wait_for(lambda u=ping: _answers(u), timeout_s, f"Ray app at {ping}", proc, log)
    except BaseException:
        engine.stop()
        raise
    return engine


def start_kserve(tmp: Path, model_dir: Path, timeout_s: float = 180, extra: tuple[str, ...] = ()) -> Engine:
    """KServe's ModelServer (``python -m archiver.integrations.kserve``) on free ports, once ready."""
    port, grpc_port = free_port(), free_port()
    mark = uuid.uuid4().hex
    log = tmp / "kserve.log"
    command = [
        sys.executable,
        "-m",
        "archiver.integrations.kserve",
        "--model_dir",
        str(model_dir),
        "--http_port",
        str(port),
        "--grpc_port",
        str(grpc_port),
        *extra,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=tmp,
            env=engine_env(tmp, mark),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    engine = Engine(proc, f"http://127.0.0.1:{port}", log, mark)
    try:
        wait_for(lambda: _answers(engine.url + "/v2/health/ready"), timeout_s, "KServe ready", proc, log)
    except BaseException:
        engine.stop()
        raise
    return engine


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for tests (``--import-mode=importlib`` forbids importing conftest)."""
    return SimpleNamespace(
        http=http,
        wait_for=wait_for,
        start_ray=start_ray,
        start_kserve=start_kserve,
        write_echo=write_echo,
        marked_processes=marked_processes,
        echo_inputs=ECHO_INPUTS,
    )
