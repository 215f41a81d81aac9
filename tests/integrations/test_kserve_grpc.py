"""Our KServe model over v2 gRPC through KServe's own server (its gRPC port, ``--enable_grpc`` on by
default), called with tritonclient.grpc in a process of its own (tritonclient and kserve register
clashing ``inference`` protos, so they never share one)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

CLIENT = """
import json, sys

import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException

c = g.InferenceServerClient(sys.argv[1])
out = {"live": c.is_server_live(), "ready": c.is_model_ready("doubler")}
out["meta"] = c.get_model_metadata("echo", as_json=True)
rows = np.array([[1, 2, 3, 4], [-1, 0.5, 0, 2]], dtype=np.float32)
tensor = g.InferInput("input-0", [2, 4], "FP32")
tensor.set_data_from_numpy(rows)
result = c.infer("doubler", [tensor], request_id="g-1", client_timeout=60)
out["doubler"] = result.as_numpy("output-0").tolist()
out["id"] = result.get_response().id
words = g.InferInput("text", [1], "BYTES")
words.set_data_from_numpy(np.array([b"over grpc"], dtype=object))
out["echo"] = [v.decode() for v in c.infer("echo", [words], client_timeout=60).as_numpy("output-0").tolist()]
try:
    c.infer("nope", [tensor], client_timeout=60)
except InferenceServerException as e:
    out["nope"] = e.status()
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def kserve_grpc(tmp_path_factory, kit, echo_archives, tensor_archive):
    tmp = tmp_path_factory.mktemp("kserve-grpc")
    models = tmp / "models"
    models.mkdir()
    shutil.copy(tensor_archive, models / tensor_archive.name)
    shutil.copytree(echo_archives[0], models / "echo")
    port = _free_port()
    engine = kit.start_kserve(tmp, models, extra=("--grpc_port", str(port), "--enable_grpc", "true"))
    yield engine, f"127.0.0.1:{port}"
    engine.stop()


def test_tritonclient_grpc_calls_our_kserve_model(kserve_grpc, tmp_path) -> None:
    _, address = kserve_grpc
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(CLIENT))
    done = subprocess.run([sys.executable, str(script), address], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["live"] and out["ready"]
    assert out["meta"]["name"] == "echo"
    assert out["doubler"] == [[3, 5, 7, 9], [-1, 2, 1, 5]] and out["id"] == "g-1"
    assert "over grpc" in out["echo"][0]
    assert out["nope"] == "StatusCode.NOT_FOUND"
