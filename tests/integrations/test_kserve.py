"""Archives on KServe's own ModelServer (`python -m archiver.integrations.kserve`), called with KServe's
InferenceRESTClient (v1 and v2) and tritonclient (v2, binary): the seed's ResNet34 and a built-in
image_classifier archive served from one folder, as KServe mounts a storage URI at /mnt/models."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil

import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kserve_engine(tmp_path_factory, kit, seed_archive, classifier_archive, echo_archives, tensor_archive):
    tmp = tmp_path_factory.mktemp("kserve")
    models = tmp / "models"
    models.mkdir()
    shutil.copy(seed_archive, models / seed_archive.name)
    shutil.copy(classifier_archive, models / classifier_archive.name)
    shutil.copy(tensor_archive, models / tensor_archive.name)
    shutil.copytree(echo_archives[0], models / "echo")  # a folder archive beside the .mar files
    engine = kit.start_kserve(tmp, models)
    yield engine
    engine.stop()
    assert not engine.processes(), "the KServe server outlived its SIGINT"


def infer(base_url: str, protocol: str, payload, model: str):
    async def call():
        client = InferenceRESTClient(RESTConfig(protocol=protocol, retries=0, timeout=60))
        try:
            return await client.infer(base_url, payload, model_name=model)
        finally:
            await client.close()

    return asyncio.run(call())


def test_v1_instances_of_one_call_are_one_batch(kserve_engine):
    instances = ["a", {"b64": base64.b64encode(b"b").decode()}, {"data": 3}]
    result = infer(kserve_engine.url, "v1", {"instances": instances}, "echo")
    assert [p["echo"] for p in result["predictions"]] == ["a", "b", "3"]
    assert {p["batch"] for p in result["predictions"]} == {3}


def test_v2_metadata_gives_the_archives_declared_signature(kserve_engine, kit):
    meta = kit.http("GET", kserve_engine.url + "/v2/models/echo").json()
    assert meta["name"] == "echo" and meta["inputs"] == kit.echo_inputs


def test_v1_predict_runs_the_seed_handler(kserve_engine, kitten_bytes, seed_labels):
    image = {"b64": base64.b64encode(kitten_bytes).decode()}
    result = infer(kserve_engine.url, "v1", {"instances": [image, image, image]}, "resnet34")
    predictions = result["predictions"]
    assert len(predictions) == 3 and predictions[0] == predictions[1] == predictions[2]
    assert predictions[0]["label"] == seed_labels[str(predictions[0]["index"])][1]


def test_v2_infer_with_kserves_client_reaches_the_builtin_image_classifier(kserve_engine, kitten_bytes):
    # KServe decodes JSON BYTES as UTF-8 text, so the image travels as base64 (the vision handlers
    # decode base64 text as TorchServe's do).
    encoded = base64.b64encode(kitten_bytes).decode()
    tensor = InferInput(name="image", shape=[1], datatype="BYTES", data=[encoded])
    request = InferRequest(model_name="cnn", infer_inputs=[tensor], request_id="kserve-1")
    response = infer(kserve_engine.url, "v2", request, "cnn")
    assert response.id == "kserve-1" and response.model_name == "cnn"
    output = response.outputs[0]
    assert output.datatype == "BYTES" and output.shape == [1]
    scores = json.loads(output.data[0])
    assert scores and set(scores) <= {f"class_{i}" for i in range(6)}


def test_v2_binary_request_from_tritonclient(kserve_engine, kitten_bytes):
    # The binary tensor extension both ways; KServe decodes every BYTES element as UTF-8 text (a raw
    # JPEG is refused by KServe itself), so the image goes as base64 here too.
    client = triton.InferenceServerClient(kserve_engine.url.removeprefix("http://"), network_timeout=60)
    try:
        tensor = triton.InferInput("image", [1], "BYTES")
        encoded = base64.b64encode(kitten_bytes)
        tensor.set_data_from_numpy(np.array([encoded], dtype=object), binary_data=True)
        wanted = triton.InferRequestedOutput("output-0", binary_data=True)
        result = client.infer("cnn", [tensor], outputs=[wanted], request_id="t-1")
    finally:
        client.close()
    assert result.get_response()["id"] == "t-1"
    scores = json.loads(result.as_numpy("output-0")[0])
    assert scores and set(scores) <= {f"class_{i}" for i in range(6)}


def test_v2_fp32_tensors_reach_a_bare_basehandler_model_and_come_back(kserve_engine):
    rows = np.array([[1, 2, 3, 4], [-1, 0.5, 0, 2]], dtype=np.float32)
    client = triton.InferenceServerClient(kserve_engine.url.removeprefix("http://"), network_timeout=60)
    try:
        tensor = triton.InferInput("input-0", [2, 4], "FP32")
        tensor.set_data_from_numpy(rows, binary_data=True)
        binary = client.infer("doubler", [tensor])
        tensor.set_data_from_numpy(rows, binary_data=False)
        # KServe reads a body without Content-Type: application/json as binary (tritonclient sets none).
        as_json = client.infer(
            "doubler",
            [tensor],
            outputs=[triton.InferRequestedOutput("output-0", binary_data=False)],
            headers={"Content-Type": "application/json"},
        )
    finally:
        client.close()
    for result in (binary, as_json):
        output = result.get_output("output-0")
        assert output["datatype"] == "FP32" and output["shape"] == [2, 4]
        np.testing.assert_allclose(result.as_numpy("output-0"), rows * 2 + 1)

    request = InferRequest(
        model_name="doubler",
        infer_inputs=[InferInput(name="x", shape=[1, 4], datatype="FP32", data=[0.0, 1.0, 2.0, 3.0])],
    )
    response = infer(kserve_engine.url, "v2", request, "doubler")
    assert response.outputs[0].shape == [1, 4]
    assert list(response.outputs[0].data) == [1.0, 3.0, 5.0, 7.0]


def test_a_bad_request_is_a_400_and_the_server_goes_on(kserve_engine, kit, kitten_bytes):
    broken = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0]}]}
    refused = kit.http(
        "POST",
        kserve_engine.url + "/v2/models/cnn/infer",
        json.dumps(broken).encode(),
        {"Content-Type": "application/json"},
    )
    assert refused.status == 400 and "2 elements" in refused.json()["error"]
    junk = kit.http(
        "POST",
        kserve_engine.url + "/v1/models/cnn:predict",
        json.dumps({"instances": [{"b64": base64.b64encode(b"not an image").decode()}]}).encode(),
        {"Content-Type": "application/json"},
    )
    assert junk.status == 400, junk.body
    assert kit.http("GET", kserve_engine.url + "/v2/models/resnet34/ready").json()["ready"] is True
    image = {"b64": base64.b64encode(kitten_bytes).decode()}
    assert "predictions" in infer(kserve_engine.url, "v1", {"instances": [image]}, "resnet34")
