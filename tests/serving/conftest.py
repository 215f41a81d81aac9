"""Helpers for the serving tests: small real models in folder archives, a live server, plain HTTP calls."""

from __future__ import annotations

import json
import socket
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from archiver.serving.registry import ModelSettings
from archiver.serving.server import ServerSettings, ServerThread

# A pure-Python handler whose behaviour the request body chooses, so one model can play every role:
# "raise" fails the batch, "hang" never answers, "wrong" returns no answers, "sleep:S" works S seconds,
# "bad…" is rejected alone (HandlerInputError), anything else is echoed with the batch size it rode in.
ECHO_HANDLER = """
import json
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


@pytest.fixture
def raw() -> Callable[..., bytes]:
    """raw_exchange(port, payload): bytes on a bare socket, for requests no client library would send."""
    return raw_exchange
