"""v2 model metadata (from model-config.yaml's signature, else a .pt2 program's graph), a bare
BaseHandler on a .pt2 model answering tritonclient, and readiness that tells the truth while loading."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.http as triton

BARE = "from handlers import BaseHandler\n\n\nclass H(BaseHandler):\n    pass\n"
SLOW = """
import time

from handlers import BaseHandler


class Slow(BaseHandler):
    def initialize(self, context):
        time.sleep(3)
        self.initialized = True

    def handle(self, data, context):
        return ["ok" for _ in data]
"""


def with_pt2(folder: Path) -> Path:
    """Give a folder archive a torch.export program of Linear(4, 2) with a dynamic batch."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 2).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(linear, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "linear.pt2"))
    manifest_path = folder / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["serializedFile"] = "linear.pt2"
    manifest_path.write_text(json.dumps(manifest))
    (folder / "weights.json").write_text(
        json.dumps({"weight": linear.weight.tolist(), "bias": linear.bias.tolist()})
    )
    return folder


def test_metadata_of_a_pt2_program_and_its_tensors_through_tritonclient(serve: Any, make_model: Any) -> None:
    folder = with_pt2(make_model("linear", handler_source=BARE))
    server = serve([folder])
    client = triton.InferenceServerClient(server.url().removeprefix("http://"))
    try:
        meta = client.get_model_metadata("linear")
        assert meta["platform"] == "pytorch_pt2" and meta["versions"] == ["1.0"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["outputs"] == [{"name": "output-0", "datatype": "FP32", "shape": [-1, 2]}]
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        tensor = triton.InferInput("input", [3, 4], "FP32")
        tensor.set_data_from_numpy(x)
        out = client.infer("linear", [tensor]).as_numpy("output-0")
    finally:
        client.close()
    weights = json.loads((folder / "weights.json").read_text())
    expected = x @ np.array(weights["weight"], np.float32).T + np.array(weights["bias"], np.float32)
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_metadata_from_the_signature_in_model_config(serve: Any, make_model: Any, call: Any) -> None:
    config = textwrap.dedent(
        """
        batchSize: 4
        signature:
          inputs: [{name: image, datatype: BYTES, shape: [1]}]
          outputs: [{name: output-0, datatype: BYTES, shape: [1]}]
        """
    )
    folder = make_model("declared", config_yaml=config)
    server = serve([folder])
    reply = call("GET", server.url() + "/v2/models/declared/versions/1.0")
    assert reply.status == 200
    assert reply.json() == {
        "name": "declared",
        "versions": ["1.0"],
        "platform": "python",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": "output-0", "datatype": "BYTES", "shape": [1]}],
    }
    assert call("GET", server.url() + "/v2/models/nobody").status == 404


def test_readiness_is_false_until_every_startup_model_has_loaded(
    serve_process: Any, make_model: Any, call: Any, poll: Any
) -> None:
    folder = make_model("slow", handler_source=SLOW)
    _, urls = serve_process("--models", f"slow={folder}", ready=False)
    base = urls["inference"]
    assert call("GET", base + "/v2/health/live").json() == {"live": True}
    first = call("GET", base + "/v2/health/ready")
    assert first.status == 503 and first.json() == {"ready": False}
    model = call("GET", base + "/v2/models/slow/ready")
    assert model.status == 503 and model.json() == {"name": "slow", "ready": False}
    assert call("GET", base + "/v1/models/slow").json() == {"name": "slow", "ready": False}
    poll(lambda: call("GET", base + "/v2/health/ready").status == 200, 60, "ready")
    assert call("GET", base + "/v2/models/slow/ready").json() == {"name": "slow", "ready": True}
    assert call("GET", base + "/v1/models/slow").json() == {"name": "slow", "ready": True}
    server = call("GET", base + "/v2").json()
    assert server["name"] == "model-archiver" and "binary_tensor_data" in server["extensions"]


def test_a_pt2_inside_a_mar_is_read_too(make_model: Any, tmp_path: Path) -> None:
    import zipfile

    from archiver.serving.protocols.oip_metadata import read_signature

    folder = with_pt2(make_model("zipped", handler_source=BARE))
    mar = tmp_path / "zipped.mar"
    with zipfile.ZipFile(mar, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
    inputs, outputs = read_signature(mar, manifest)
    assert inputs == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert outputs == [{"name": "output-0", "datatype": "FP32", "shape": [-1, 2]}]
