"""Helpers for the example tests: a README's shell commands, run verbatim in one shell, as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
# The venv the tests run in: its bin/ has `python` and `model-archiver`, as an activated venv would.
VENV_BIN = Path(sys.executable).parent
INFERENCE_PORTS = (8080, 8081, 8082)  # TorchServe's defaults, which the READMEs use as they are


def parse_readme_commands(readme: Path) -> list[str]:
    """The commands of a README's ```bash blocks, in order (comments dropped, `\\` continuations joined)."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", readme.read_text(), flags=re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            commands.append(pending + line)
            pending = ""
        if pending:
            commands.append(pending.strip())
    return commands


@dataclass
class StepResult:
    command: str
    returncode: int
    output: str  # stdout and stderr together, as a terminal shows them

    def json_answer(self) -> object:
        """The JSON document in the output (curl prints the body alone; tools may print lines around it)."""
        start = min((i for i in (self.output.find("{"), self.output.find("[")) if i >= 0), default=-1)
        assert start >= 0, f"no JSON in the output of {self.command!r}:\n{self.output}"
        value, _ = json.JSONDecoder().raw_decode(self.output[start:])
        return value


class ShellSession:
    """One long-lived bash, fed one command at a time: `&`, `$!` and `kill %1` work as in a terminal.

    Each command's output goes to a file of its own, so a background server's log stays with the command
    that started it. The whole process group (bash and everything it started) is killed by close().
    """

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self._outputs = cwd.parent / f"{cwd.name}-outputs"
        self._outputs.mkdir()
        self._count = 0
        self._pending = b""
        self._proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=0,
            start_new_session=True,
        )

    def run(self, command: str, timeout_s: float = 120) -> StepResult:
        self._count += 1
        out = self._outputs / f"step-{self._count}.txt"
        marker = f"__step_done_{uuid.uuid4().hex}__"
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{{\n{command}\n}} > {out} 2>&1 < /dev/null\necho {marker} $?\n".encode())
        self._proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        found = None
        while found is None:
            # A step that hangs past its deadline fails the test; close() then kills everything.
            if time.monotonic() > deadline or not self._read_some(deadline):
                output = out.read_text(errors="replace") if out.exists() else ""
                shell_said = self._pending.decode(errors="replace")
                pytest.fail(f"step did not finish within {timeout_s} s: {command!r}\n{output}{shell_said}")
            found = re.search(rf"{marker} (\d+)\n".encode(), self._pending)
        self._pending = self._pending[found.end() :]
        return StepResult(command, int(found.group(1)), out.read_text(errors="replace"))

    def _read_some(self, deadline: float) -> bool:
        """Wait (up to 1 s, never past deadline) for bash to print; False once bash has exited."""
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, min(1.0, deadline - time.monotonic())))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return False
            self._pending += chunk
        return self._proc.poll() is None

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        # Background jobs outlive bash when it exits first; they are still in its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()


def ports_free(ports: tuple[int, ...]) -> bool:
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def wait_port_closed(port: int, timeout_s: float) -> bool:
    """True once nothing accepts connections on 127.0.0.1:port (polled, with a deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.1)
    return False


@pytest.fixture
def example_copy(tmp_path: Path):
    """Copy an example folder (without build outputs) into a temp dir: returns a function name -> path."""

    def copy(name: str) -> Path:
        dest = tmp_path / name
        outputs = shutil.ignore_patterns("*.pt", "*.mar", "model-store", "__pycache__")
        shutil.copytree(EXAMPLES / name, dest, ignore=outputs)
        return dest

    return copy


@pytest.fixture
def shell():
    """Start a ShellSession in a folder, like a user's terminal with the venv active; closed at teardown."""
    if shutil.which("curl") is None:
        pytest.skip("the READMEs talk to the server with curl, which is not installed")
    sessions: list[ShellSession] = []

    def start(cwd: Path) -> ShellSession:
        env = dict(os.environ)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["MODEL_ARCHIVER_CACHE"] = str(cwd.parent / "model-cache")
        session = ShellSession(cwd, env)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()


@pytest.fixture
def default_ports_or_skip():
    """The READMEs serve on TorchServe's ports 8080-8082, verbatim; skip (saying why) when those are taken."""
    if not ports_free(INFERENCE_PORTS):
        pytest.skip("ports 8080-8082 on 127.0.0.1 are in use, and the README commands are run verbatim")
    return INFERENCE_PORTS


@pytest.fixture
def readme_commands():
    """parse_readme_commands(path): the commands of a README's ```bash blocks."""
    return parse_readme_commands


@pytest.fixture
def port_closes():
    """wait_port_closed(port, timeout_s): True once nothing listens on 127.0.0.1:port."""
    return wait_port_closed
