"""Test the seed's handler with model-archiver's pytest plugin: in-process, then through a live server.

Run it with ``pytest examples/resnet34`` (the project's ``scripts/test.sh`` runs it too). The fixtures
``mar_model``, ``mar_archive`` and ``mar_server`` come from the plugin that installing model-archiver
registers with pytest: nothing to import. The test needs no export and no download: it archives the
handler with a tiny random TorchScript model standing in for ``resnet34.pt`` (same input, 1000
classes), so it checks the handler's code, not the model's accuracy.
"""

import json
import urllib.request
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
KITTEN = HERE / "inputs" / "kitten.jpg"
MAPPING = json.loads((HERE / "index_to_name.json").read_text())
# torch 2.14 marks torch.jit deprecated; the seed (and BaseHandler, for .pt files) still uses it.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def archive_flags(tmp_path_factory):
    """The README's archiver flags, with a tiny model in place of the exported resnet34.pt."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 1000)
    ).eval()
    model_pt = tmp_path_factory.mktemp("tiny") / "resnet34.pt"
    torch.jit.trace(model, torch.randn(1, 3, 224, 224)).save(str(model_pt))
    return {
        "model_name": "resnet34",
        "version": "1.0",
        "serialized_file": model_pt,
        "handler": HERE / "my_handler.py",
        "extra_files": [HERE / "index_to_name.json", HERE / "MyHandler.py"],
    }


def assert_label(answer):
    """The seed handler's answer: {"label": name, "index": i}, the name being index_to_name.json's."""
    assert set(answer) == {"label", "index"}
    assert 0 <= answer["index"] < 1000
    assert answer["label"] == MAPPING[str(answer["index"])][1]


def test_predicts_the_kitten_in_process(mar_model, archive_flags):
    model = mar_model(**archive_flags)  # archived, loaded and initialized in this process
    [answer] = model.predict([KITTEN.read_bytes()])
    assert_label(answer)


def test_answers_each_image_of_a_batch(mar_model, archive_flags):
    model = mar_model(**archive_flags)
    answers = model.predict([KITTEN.read_bytes()] * 3)
    assert len(answers) == 3 and answers[0] == answers[1] == answers[2]


def test_the_served_archive_answers_as_in_process(mar_archive, mar_model, mar_server, archive_flags):
    archive = mar_archive(**archive_flags)  # model-store/resnet34.mar, as the README's command makes it
    [expected] = mar_model(archive).predict([KITTEN.read_bytes()])
    server = mar_server(archive)  # free ports; returns when the model is ready; stopped after the test
    request = urllib.request.Request(
        server.predictions_url("resnet34"),
        data=KITTEN.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    assert_label(answer)
    assert answer == expected
