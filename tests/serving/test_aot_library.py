"""TorchServe's ``examples/pt2/torch_export_aot_compile`` story on a tiny model: a ``.so`` written by
``torch._export.aot_compile`` (batch 2 to 8, as the example exports it), archived with the README's
command line and ``pt2: {export: {aot_compile: true}}``, served over real HTTP by the built-in image
classifier; without that config line the library is refused with the reason, as TorchServe refuses it.

The one compile (tens of seconds on 2 cores) is shared by the module.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from handlers.vision import imagenet_tensor
from tests.serving.tiny_cnn import LABELS, TinyCNN

pytestmark = pytest.mark.slow

AOT_CONFIG = "pt2 :\n  export:\n    aot_compile: true\n"  # the example's model-config.yaml, as written


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """TinyCNN compiled the example's way into tiny_pt2.so, with its labels beside it."""
    work = tmp_path_factory.mktemp("aot_library")
    torch.manual_seed(0)
    model = TinyCNN().eval()
    batch = torch.export.Dim("batch", min=2, max=8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # aot_compile's deprecation banner
        path = torch._export.aot_compile(
            model,
            (torch.randn(2, 3, 224, 224),),
            dynamic_shapes={"x": {0: batch}},
            options={"aot_inductor.output_path": str(work / "tiny_pt2.so")},
        )
    (work / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(LABELS)}))
    return SimpleNamespace(model=model, so=Path(path), work=work)


def archive(library: SimpleNamespace, name: str, config: str | None) -> Path:
    """The README's command line with our program name: model-archiver --model-name ... ."""
    cmd = [sys.executable, "-m", "archiver", "--model-name", name, "--handler", "image_classifier"]
    cmd += ["--version", "1.0", "--serialized-file", str(library.so), "--extra-files"]
    cmd += [str(library.work / "index_to_name.json"), "--export-path", str(library.work)]
    if config is not None:
        (library.work / f"{name}.yaml").write_text(config)
        cmd += ["--config-file", str(library.work / f"{name}.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return library.work / f"{name}.mar"


def top5(model: torch.nn.Module, image: bytes) -> dict[str, float]:
    with torch.no_grad():
        tensor = imagenet_tensor(Image.open(io.BytesIO(image)).convert("RGB")).unsqueeze(0)
        values, indices = model(tensor).softmax(1)[0].topk(5)
    return {LABELS[i]: v for i, v in zip(indices.tolist(), values.tolist(), strict=True)}


def test_the_so_model_answers_as_the_model_it_was_compiled_from(
    library: SimpleNamespace, serve, call, kitten_bytes: bytes
) -> None:
    server = serve([("res18-pt2", archive(library, "res18-pt2", AOT_CONFIG))])
    # A batch of one, below the min=2 of the batch dimension it was compiled with (curl -T's upload).
    reply = call("PUT", server.url() + "/predictions/res18-pt2", kitten_bytes)
    assert reply.status == 200, reply.body[:300]
    want = top5(library.model, kitten_bytes)
    assert list(reply.json()) == list(want)
    assert reply.json() == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_without_the_config_line_the_library_is_refused_with_the_reason(
    library: SimpleNamespace, serve, call, describe, kitten_bytes: bytes
) -> None:
    server = serve([archive(library, "unasked", None)])
    described = describe(call, server, "unasked")
    assert described["status"] == "FAILED", described
    assert "tiny_pt2.so is a shared library" in described["loadError"]
    assert "pt2: {export: {aot_compile: true}}" in described["loadError"]
    reply = call("PUT", server.url() + "/predictions/unasked", kitten_bytes)
    assert reply.status == 503 and "aot_compile: true" in reply.json()["message"]
