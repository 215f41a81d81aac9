"""A model whose model-config.yaml says ``deviceType: gpu`` is never served on the CPU by surprise
(issue 23): when the server hands its worker a GPU but the worker's torch has no CUDA, the model is
FAILED with that reason, where TorchServe (and BaseHandler before) quietly loaded it on the CPU. A
model that does not insist (no deviceType) still falls back to the CPU, as TorchServe's does.

The server finds GPUs through a stand-in ``nvidia-smi`` on PATH (``gpu_fakes.py``); this machine's
torch has no CUDA, which is the case under test."""

from __future__ import annotations

import json

import pytest
import torch

from tests.serving.conftest import http
from tests.serving.gpu_fakes import gpu, install_fake_nvidia_smi

BASE_HANDLER_MODEL = """
from handlers import BaseHandler


class Handler(BaseHandler):
    pass
"""


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    fake = install_fake_nvidia_smi(tmp_path / "fake-nvidia")
    monkeypatch.setenv("PATH", fake.path_env())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake.write([gpu(0), gpu(1)])
    return fake


def scripted_model(make_model, name: str, config_yaml: str | None):
    model = make_model(name, handler_source=BASE_HANDLER_MODEL, config_yaml=config_yaml)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), str(model / "model.pt"))
    manifest = json.loads((model / "MAR-INF" / "MANIFEST.json").read_text())
    manifest["model"]["serializedFile"] = "model.pt"
    (model / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_device_type_gpu_given_a_gpu_without_cuda_is_failed_with_the_reason(serve, make_model, fake_gpus):
    assert not torch.cuda.is_available()  # the machine this story is about
    model = scripted_model(make_model, "insists", "deviceType: gpu\n")
    server = serve([model])
    described = http("GET", server.url("management") + "/models/insists").json()[0]
    assert described["status"] == "FAILED", described
    assert "deviceType: gpu" in described["loadError"]
    assert "GPU 1" in described["loadError"] and "has no CUDA" in described["loadError"]
    assert "site-packages" not in described["loadError"]
    reply = http(
        "POST", server.url() + "/predictions/insists", b"[1.0, 2.0]", {"Content-Type": "application/json"}
    )
    assert reply.status == 503 and "has no CUDA" in reply.json()["message"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_without_device_type_the_same_model_still_falls_back_to_the_cpu(serve, make_model, fake_gpus):
    model = scripted_model(make_model, "flexible", None)
    server = serve([model])
    worker = http("GET", server.url("management") + "/models/flexible").json()[0]["workers"][0]
    assert worker["gpuId"] == 1 and worker["device"] == "cpu"
    reply = http(
        "POST", server.url() + "/predictions/flexible", b"[1.0, 2.0]", {"Content-Type": "application/json"}
    )
    assert reply.status == 200
