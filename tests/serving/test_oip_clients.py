"""The Open Inference Protocol (v2) and KServe v1 routes, driven by the real clients: tritonclient.http
(binary and JSON) and kserve's InferenceRESTClient, against one live server holding a bare BaseHandler
tensor model, an INT64 model and the built-in image_classifier."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from archiver.serving.front.server import ServerSettings, ServerThread
from archiver.serving.supervisor.registry import ModelSettings

QUIET = {"action": "ignore", "category": FutureWarning}
WEIGHT = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]])
BIAS = torch.tensor([0.5, -0.25])
BARE_HANDLER = "from handlers import BaseHandler\n\n\nclass H(BaseHandler):\n    pass\n"


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 7, stride=8)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


def torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter(**QUIET)
        torch.jit.save(torch.jit.trace(module.eval(), example), str(path))


def add_model_file(folder: Path, name: str, module: torch.nn.Module, example: torch.Tensor) -> Path:
    torchscript(module, example, folder / "model.pt")
    manifest_path = folder / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["serializedFile"] = "model.pt"
    manifest_path.write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, serving_kit: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oip-models")
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(WEIGHT)
        linear.bias.copy_(BIAS)
    tiny = serving_kit.write_model(
        root, "tiny", handler_source=BARE_HANDLER, config_yaml="batchSize: 8\nmaxBatchDelay: 200\n"
    )
    add_model_file(tiny, "tiny", linear, torch.randn(2, 4))
    ints = serving_kit.write_model(root, "ints", handler_source=BARE_HANDLER)
    add_model_file(ints, "ints", Doubler(), torch.ones(2, 3, dtype=torch.int64))
    cnn = serving_kit.write_model(root, "cnn", handler_source="", handler_file="unused.py")
    add_model_file(cnn, "cnn", TinyCNN(), torch.randn(1, 3, 224, 224))
    manifest_path = cnn / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["handler"] = "image_classifier"
    manifest_path.write_text(json.dumps(manifest))
    (cnn / "unused.py").unlink()
    labels = {str(i): name for i, name in enumerate(["tabby", "tiger", "lynx", "otter", "heron", "wren"])}
    (cnn / "index_to_name.json").write_text(json.dumps(labels))
    return {"tiny": tiny, "ints": ints, "cnn": cnn}


@pytest.fixture(scope="module")
def server(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(
        port=0,
        management_port=0,
        metrics_port=0,
        models=[(None, path) for path in models.values()],
        defaults=ModelSettings(),
        cache_dir=tmp_path_factory.mktemp("oip-cache"),
    )
    thread = ServerThread(settings).start()
    yield thread
    thread.stop()


@pytest.fixture
def client(server: ServerThread):
    c = triton.InferenceServerClient(server.url().removeprefix("http://"), concurrency=8)
    yield c
    c.close()


def expected_tiny(x: np.ndarray) -> np.ndarray:
    return x @ WEIGHT.numpy().T + BIAS.numpy()


def test_server_and_model_metadata_and_health(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1.0")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "model-archiver" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("tiny")
    assert model["name"] == "tiny" and model["versions"] == ["1.0"]
    assert model["platform"] == "pytorch_torchscript"
    assert model["inputs"] == [] and model["outputs"] == []  # TorchScript records no input shapes


@pytest.mark.parametrize("binary", [True, False])
def test_bare_base_handler_answers_fp32_tensors_rows_as_the_batch(
    client: triton.InferenceServerClient, binary: bool
) -> None:
    x = np.array([[1, 2, 3, 4], [0.5, -1, 2, 0]], dtype=np.float32)
    tensor = triton.InferInput("input-0", [2, 4], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [triton.InferRequestedOutput("output-0", binary_data=binary)]
    result = client.infer("tiny", [tensor], outputs=wanted, request_id="req-7")
    out = result.as_numpy("output-0")
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, expected_tiny(x), rtol=1e-6)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "tiny"
    assert response["model_version"] == "1.0"


def test_outputs_default_to_binary_for_tritonclient(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    result = client.infer("tiny", [tensor])  # no outputs named: binary_data_output
    assert result.get_output("output-0")["parameters"]["binary_data_size"] == 8
    np.testing.assert_allclose(result.as_numpy("output-0"), expected_tiny(np.ones((1, 4), np.float32)))


@pytest.mark.parametrize("binary", [True, False])
def test_int64_tensors_keep_their_datatype(client: triton.InferenceServerClient, binary: bool) -> None:
    x = np.array([[1, -2, 3], [2**40, 0, 7]], dtype=np.int64)
    tensor = triton.InferInput("n", [2, 3], "INT64")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer(
        "ints", [tensor], outputs=[triton.InferRequestedOutput("output-0", binary_data=binary)]
    )
    out = result.as_numpy("output-0")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, x * 2 + 1)


@pytest.mark.parametrize("binary", [True, False])
def test_image_classifier_takes_a_bytes_image_and_answers_bytes_json(
    client: triton.InferenceServerClient, kitten_bytes: bytes, binary: bool
) -> None:
    tensor = triton.InferInput("image", [1], "BYTES")
    # JSON BYTES must be text: the image goes base64-encoded, which the vision handlers decode.
    element = kitten_bytes if binary else base64.b64encode(kitten_bytes)
    tensor.set_data_from_numpy(np.array([element], dtype=object), binary_data=binary)
    result = client.infer(
        "cnn", [tensor], outputs=[triton.InferRequestedOutput("output-0", binary_data=binary)]
    )
    out = result.as_numpy("output-0")
    assert out.shape == (1,)
    answer = json.loads(out[0])
    assert len(answer) == 5 and set(answer) <= {"tabby", "tiger", "lynx", "otter", "heron", "wren"}
    assert abs(sum(answer.values()) - 1) < 0.5 and all(0 <= p <= 1 for p in answer.values())


def test_a_request_that_is_not_an_image_fails_alone(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"not a picture"], dtype=object))
    with pytest.raises(InferenceServerException, match="not an image"):
        client.infer("cnn", [tensor])


def test_several_images_in_one_request_are_refused_with_the_reason(
    client: triton.InferenceServerClient, kitten_bytes: bytes
) -> None:
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([kitten_bytes, kitten_bytes], dtype=object))
    with pytest.raises(InferenceServerException, match="expected one image per request, got 2"):
        client.infer("cnn", [tensor])


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server: ServerThread) -> None:
    """32 requests at once, each from its own tritonclient; the batch-size histogram shows batches > 1."""
    rows = [np.array([[i, i + 1, -i, 2.0]], dtype=np.float32) for i in range(32)]
    start = threading.Barrier(len(rows))

    def one(i: int) -> Any:
        client = triton.InferenceServerClient(server.url().removeprefix("http://"))
        try:
            tensor = triton.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(rows[i])
            start.wait(30)
            return client.infer("tiny", [tensor], request_id=str(i))
        finally:
            client.close()

    with ThreadPoolExecutor(len(rows)) as pool:
        results = list(pool.map(one, range(len(rows))))
    for i, result in enumerate(results):
        assert result.get_response()["id"] == str(i)
        np.testing.assert_allclose(result.as_numpy("output-0"), expected_tiny(rows[i]), rtol=1e-6)
    metrics = urllib_get(server.url("metrics") + "/metrics").decode()
    counts = batch_histogram(metrics, "tiny")
    assert counts["+Inf"] > counts["1.0"], f"no batch above 1 request: {counts}"


def urllib_get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def batch_histogram(metrics: str, model: str) -> dict[str, float]:
    """Cumulative bucket counts of model_archiver_batch_size for one model, by upper bound."""
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("model_archiver_batch_size_bucket{") and f'model="{model}"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            counts[bound] = float(line.rsplit(" ", 1)[1])
    return counts


# ---- kserve's own client ------------------------------------------------------------------------
def kserve_call(coro_factory: Any) -> Any:
    """Run a coroutine with kserve's REST client on a private loop (the server has its own)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = asyncio.run(coro_factory())
        except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_kserve_rest_client_v2_and_v1(server: ServerThread, kitten_bytes: bytes) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    base = server.url()

    async def v2() -> Any:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            tensor = InferInput("x", [2, 4], "FP32")
            tensor.set_data_from_numpy(np.array([[1, 2, 3, 4], [4, 3, 2, 1]], np.float32), binary_data=False)
            request = InferRequest(model_name="tiny", infer_inputs=[tensor], request_id="kserve-1")
            response = await client.infer(base, request, model_name="tiny")
            ready = await client.is_model_ready(base, "tiny")
            return response, ready
        finally:
            await client.close()

    response, ready = kserve_call(v2)
    assert ready is True
    assert response.id == "kserve-1"
    out = response.outputs[0].as_numpy()
    np.testing.assert_allclose(
        out.reshape(2, 2), expected_tiny(np.array([[1, 2, 3, 4], [4, 3, 2, 1]], np.float32)), rtol=1e-6
    )

    async def v1() -> Any:
        client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=30))
        try:
            # floats: BaseHandler makes a tensor of what JSON gives it, and the model takes FP32
            body = {"instances": [[1.0, 2, 3, 4], [0.0, 0, 0, 1], [2.0, 2, 2, 2]]}
            numbers = await client.infer(base, body, model_name="tiny")
            image = {"instances": [{"data": base64.b64encode(kitten_bytes).decode()}]}
            images = await client.infer(base, image, model_name="cnn")
            b64 = {"instances": [{"b64": base64.b64encode(kitten_bytes).decode()}]}
            images_b64 = await client.infer(base, b64, model_name="cnn")
            return numbers, images, images_b64
        finally:
            await client.close()

    numbers, images, images_b64 = kserve_call(v1)
    x = np.array([[1, 2, 3, 4], [0, 0, 0, 1], [2, 2, 2, 2]], np.float32)
    np.testing.assert_allclose(np.array(numbers["predictions"]), expected_tiny(x), rtol=1e-5)
    assert len(images["predictions"]) == 1 and len(images["predictions"][0]) == 5
    assert images_b64["predictions"] == images["predictions"]


def test_a_version_in_the_path_answers_and_an_unknown_one_is_a_404(
    client: triton.InferenceServerClient,
) -> None:
    tensor = triton.InferInput("n", [1, 2], "INT64")
    tensor.set_data_from_numpy(np.array([[5, 6]], dtype=np.int64))
    result = client.infer("ints", [tensor], model_version="1.0")
    assert result.get_response()["model_version"] == "1.0"
    np.testing.assert_array_equal(result.as_numpy("output-0"), [[11, 13]])
    with pytest.raises(InferenceServerException, match="Model version not found: ints version 9"):
        client.infer("ints", [tensor], model_version="9")
