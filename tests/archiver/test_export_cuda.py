"""Compiled for CUDA, on a machine without it: `export --device cuda` is refused before anything is
written, and a package or program made on a GPU is refused at load with the reason, not a crash.

This machine cannot make a CUDA package, so the tests make a CPU one and rewrite the one field torch
writes differently on a GPU: ``AOTI_DEVICE_KEY`` in the package's ``*wrapper_metadata.json`` (torch's
``_inductor/codecache.py`` sets it to the device type it compiled for), and each weight's
``tensor_meta.device`` in a program's ``data/weights/model_weights_config.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from archiver.errors import ExportError, HandlerError, UsageError
from archiver.export import export_model
from archiver.pt2 import read_pt2_info
from handlers.model_loading import load_serialized_model

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA, whatever this machine has


def _rewrite(path: Path, out: Path, suffix: str, change) -> Path:
    """A copy of the zip at ``path`` whose member ending in ``suffix`` went through ``change``."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith(suffix):
                data = json.dumps(change(json.loads(data))).encode()
            target.writestr(item, data)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("cuda_refusals")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    aoti = export_model(model, torch.rand(2, 4), work / "cpu_package.pt2", method="aoti")
    program = export_model(model, torch.rand(2, 4), work / "cpu_program.pt2", method="export")
    return work, aoti, program


def _on_cuda_package(meta: dict) -> dict:
    return {**meta, "AOTI_DEVICE_KEY": "cuda"}


def _on_cuda_program(config: dict) -> dict:
    for entry in config["config"].values():
        entry["tensor_meta"]["device"] = {"type": "cuda", "index": 0}
    return config


def test_export_device_cuda_without_cuda_is_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "model.pt2"
    done = subprocess.run(
        [sys.executable, "-m", "archiver", "export", "--model", "torchvision.models:resnet18"]
        + ["--example-input", "1,3,64,64", "--method", "aoti", "--device", "cuda", "-o", str(out)],
        capture_output=True,
        text=True,
        env=NO_GPU,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "--device cuda: this machine has no CUDA GPU that torch can use" in lines[0]
    assert "export on a machine with the GPU the server will use, or use --device cpu" in lines[0]
    assert list(tmp_path.iterdir()) == []

    traced = subprocess.run(
        [sys.executable, "-m", "archiver", "export", "--model", "torchvision.models:resnet18"]
        + ["--example-input", "1,3,64,64", "--device", "cuda", "-o", str(out)],
        capture_output=True,
        text=True,
        env=NO_GPU,
        timeout=120,
    )
    assert traced.returncode == 2
    assert "--device cuda applies to --method export and aoti" in traced.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_model_refuses_cuda_here_and_an_unknown_device(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine, on any machine
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ExportError, match="--device cuda: this machine has no CUDA GPU"):
        export_model(model, torch.rand(2, 4), tmp_path / "m.pt2", method="export", device="cuda")
    with pytest.raises(UsageError, match="device must be one of cpu, cuda, got 'tpu'"):
        export_model(model, torch.rand(2, 4), tmp_path / "m.pt2", method="export", device="tpu")
    assert list(tmp_path.iterdir()) == []


def test_a_cuda_aoti_package_is_told_apart_and_refused_at_load_on_the_cpu(tiny, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, on any machine
    work, aoti, _ = tiny
    cuda_package = _rewrite(aoti, work / "cuda_package.pt2", "wrapper_metadata.json", _on_cuda_package)
    info = read_pt2_info(cuda_package)
    assert info.device == "cuda" and info.describe().startswith("AOTInductor package, compiled for cuda")
    with pytest.raises(HandlerError) as refused:
        load_serialized_model(work, cuda_package.name, None, torch.device("cpu"))
    assert str(refused.value) == (
        "cuda_package.pt2 is an AOTInductor package compiled for cuda, and this worker has no CUDA that "
        "torch can use: export it again with --device cpu, or serve it on a GPU machine"
    )
    # The CPU package it was made from loads and runs.
    assert load_serialized_model(work, aoti.name, None, torch.device("cpu"))(torch.rand(2, 4)).shape == (2, 3)


def test_a_torch_export_program_saved_on_cuda_is_refused_at_load_on_the_cpu(tiny, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    work, _, program = tiny
    assert read_pt2_info(program).device == "cpu"
    cuda_program = _rewrite(program, work / "cuda_program.pt2", "model_weights_config.json", _on_cuda_program)
    info = read_pt2_info(cuda_program)
    assert info.device == "cuda" and info.describe() == "torch.export program, exported on cuda"
    with pytest.raises(
        HandlerError, match=r"cuda_program.pt2 is a torch.export program exported on cuda, and "
    ):
        load_serialized_model(work, cuda_program.name, None, torch.device("cpu"))


def test_a_server_lists_an_archive_of_a_cuda_package_as_failed_with_the_reason(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # its workers see no GPU, whatever the machine has
    from archiver.serving.front.server import ServerSettings, ServerThread
    from tests.serving.conftest import http, write_model

    work, aoti, _ = tiny
    model = write_model(tmp_path, "cudapkg", handler_source=BASE_HANDLER)
    _rewrite(aoti, model / "model.pt2", "wrapper_metadata.json", _on_cuda_package)
    manifest_path = model / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["serializedFile"] = "model.pt2"
    manifest_path.write_text(json.dumps(manifest))
    settings = ServerSettings(
        port=0, management_port=0, metrics_port=0, models=[(None, model)], cache_dir=tmp_path / "cache"
    )
    with ServerThread(settings) as server:
        described = http("GET", server.url("management") + "/models/cudapkg").json()[0]
    assert described["status"] == "FAILED"
    assert (
        "model.pt2 is an AOTInductor package compiled for cuda, and this worker has no CUDA"
        in (described["loadError"])
    )


BASE_HANDLER = "from handlers import BaseHandler\n\n\nclass H(BaseHandler):\n    pass\n"
