"""How many workers a model gets when nobody said: measured on its own example the first time, read
back from the cache after that, overridden by the operator, never more threads than cores, and the
rule (1 worker, every core) when the example fails; each pool's thread share at the cores over all
workers (what a lone batch gets: test_thread_follow.py)."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

from archiver.serving.supervisor.calibration import candidate_workers, cores
from archiver.serving.supervisor.calibration_timing import WINDOW_S

# A pure-Python handler (its worker never imports torch, so it loads in a moment) for v2 requests:
# one answer per request. With FAIL set it refuses every request, as a model whose example input is
# the wrong shape would.
V2_HANDLER = """
FAIL = {fail}


def handle(data, context):
    if not data:
        return None
    if FAIL:
        raise ValueError("this model takes no such input")
    return [{{"rows": len(row["tensors"]["x"])}} for row in data]
"""

SIGNATURE = """
batchSize: 4
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1, 3]}]
  outputs: [{name: output-0, datatype: FP32, shape: [-1, 1]}]
"""

NO_GRPC = ("--grpc-port", "off", "--grpc-management-port", "off")  # their fixed ports: one server at a time


# A custom handler in TorchServe's style that reads pictures itself (PIL only: no torch, a quick load).
PICTURE_HANDLER = """
import io

from PIL import Image


def handle(data, context):
    if not data:
        return None
    return [{"size": list(Image.open(io.BytesIO(row["body"])).convert("RGB").size)} for row in data]
"""


def _calibrated(make_model: Any, name: str = "linear", fail: bool = False) -> Path:
    return make_model(name, handler_source=V2_HANDLER.format(fail=fail), config_yaml=SIGNATURE)


def _split(describe: Any, call: Any, server: Any, model: str) -> tuple[dict, dict]:
    described = describe(call, server, model)
    return described["workerSplit"], described


def test_the_split_is_measured_once_then_read_back_from_the_cache(
    serve: Any, make_model: Any, call: Any, describe: Any, tmp_path: Path, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "archiver.serving")
    folder = _calibrated(make_model)
    first = serve([folder])
    split, described = _split(describe, call, first, "linear")
    assert split["chosenBy"] == "calibration" and split["reason"].startswith("measured ")
    assert split["workers"] in (1, candidate_workers(cores(), 8))
    assert split["workers"] * split["threadsPerWorker"] <= cores()
    assert described["minWorkers"] == split["workers"] == len(described["workers"])
    assert described["loadTimeSeconds"] >= 2 * WINDOW_S  # both splits were timed before it was READY
    said = [r.getMessage() for r in caplog.records if "linear" in r.getMessage()]
    assert any(f"{split['workers']} worker(s) x" in m and "calibration: measured" in m for m in said), said
    [cached] = (tmp_path / "cache" / "calibration").iterdir()
    assert cached.name.endswith(f"-{cores()}cores-batch4-v3.json")
    first.stop()

    second = serve([folder])  # same archive, same cache: nothing is measured again
    again, described_again = _split(describe, call, second, "linear")
    assert again["chosenBy"] == "cache" and again["workers"] == split["workers"]
    assert again["reason"].startswith(f"calibrated earlier ({split['reason']})")
    assert described_again["loadTimeSeconds"] < described["loadTimeSeconds"]
    reply = call(
        "POST",
        second.url() + "/v2/models/linear/infer",
        body=b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}',
        headers={"Content-Type": "application/json"},
    )
    assert reply.status == 200, reply.body


def test_the_operator_and_the_archive_choose_over_calibration(
    serve: Any, make_model: Any, call: Any, describe: Any, tmp_path: Path
) -> None:
    folder = _calibrated(make_model)
    server = serve([folder], operator={"workers": 2})
    split, described = _split(describe, call, server, "linear")
    assert split["chosenBy"] == "operator" and split["workers"] == 2 == len(described["workers"])
    assert split["threadsPerWorker"] == max(1, cores() // 2)
    server.stop()
    pinned = serve([folder], torch_threads=1)
    split, _ = _split(describe, call, pinned, "linear")
    assert split == {
        "workers": 1,
        "threadsPerWorker": 1,  # --torch-threads 1
        "chosenBy": "rule",
        "reason": "1 worker with every core (--torch-threads is set: the threads are the operator's)",
    }
    pinned.stop()
    config = SIGNATURE + "minWorkers: 1\n"
    by_archive = make_model("suggested", handler_source=V2_HANDLER.format(fail=False), config_yaml=config)
    server = serve([by_archive])
    split, _ = _split(describe, call, server, "suggested")
    assert split["chosenBy"] == "archive" and split["workers"] == 1
    assert not (tmp_path / "cache" / "calibration").exists()  # nothing was measured, nothing cached


def test_a_model_whose_example_fails_keeps_the_rule_and_the_log_says_why(
    serve: Any, make_model: Any, call: Any, describe: Any, caplog: Any, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, "archiver.serving")
    folder = _calibrated(make_model, "picky", fail=True)
    server = serve([folder])
    split, described = _split(describe, call, server, "picky")
    assert split["chosenBy"] == "rule" and split["workers"] == 1 == len(described["workers"])
    assert split["reason"].startswith("1 worker with every core (calibration failed: the example request")
    assert described["status"] == "READY"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any('model "picky": calibration failed, so the rule applies' in m for m in warned), warned
    assert len(list((tmp_path / "cache" / "calibration").iterdir())) == 1  # the failure is remembered
    server.stop()
    again, _ = _split(describe, call, serve([folder]), "picky")  # and not paid for again
    assert again["chosenBy"] == "cache" and "calibration failed: the example request" in again["reason"]


def test_a_model_without_an_example_gets_the_rule_at_once(
    serve: Any, echo_model: Path, call: Any, describe: Any
) -> None:
    server = serve([echo_model])
    split, _ = _split(describe, call, server, "echo")
    assert split["chosenBy"] == "rule" and split["workers"] == 1
    assert "no example input to calibrate on" in split["reason"]


def test_the_real_cli_shows_the_operator_choice(serve_process: Any, make_model: Any, call: Any) -> None:
    import os

    folder = _calibrated(make_model)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"MODEL_ARCHIVER_TOKEN": ""}
    _, ready = serve_process("--models", f"linear={folder}", "--workers", "2", *NO_GRPC, env=env)
    manage = f"http://127.0.0.1:{ready['management_port']}/models/linear"
    described = call("GET", manage).json()[0]
    assert described["workerSplit"]["chosenBy"] == "operator"
    assert described["workerSplit"]["reason"] == "--workers (or workers: in --config)"


def test_the_cli_calibrates_a_model_nobody_sized(serve_process: Any, make_model: Any, call: Any) -> None:
    import os

    folder = _calibrated(make_model)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"MODEL_ARCHIVER_TOKEN": ""}
    proc, ready = serve_process("--models", f"linear={folder}", *NO_GRPC, env=env)
    manage = f"http://127.0.0.1:{ready['management_port']}/models/linear"
    described = call("GET", manage).json()[0]
    assert described["workerSplit"]["chosenBy"] == "calibration"
    log = textwrap.dedent(Path(proc.log).read_text())
    assert 'model "linear":' in log and "(calibration: measured" in log, log


def test_a_built_in_image_classifier_is_calibrated_on_a_generated_picture(
    serve: Any, call: Any, describe: Any, tmp_path: Path
) -> None:
    import json

    import torch

    folder = tmp_path / "pets"
    (folder / "MAR-INF").mkdir(parents=True)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=4),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).eval()
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 224, 224)), folder / "net.pt")
    (folder / "index_to_name.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    (folder / "model-config.yaml").write_text("batchSize: 4\n")
    model = {
        "modelName": "pets",
        "modelVersion": "1.0",
        "handler": "image_classifier",
        "serializedFile": "net.pt",
    }
    model["configFile"] = "model-config.yaml"
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"runtime": "python", "model": model}))
    server = serve([folder])
    split = describe(call, server, "pets")["workerSplit"]
    assert split["chosenBy"] == "calibration" and split["reason"].startswith("measured "), split
    assert split["workers"] * split["threadsPerWorker"] <= cores()


def test_a_custom_handler_that_opens_images_is_calibrated_on_a_picture(
    serve: Any, make_model: Any, call: Any, describe: Any
) -> None:
    server = serve([make_model("photos", handler_source=PICTURE_HANDLER, config_yaml="batchSize: 4\n")])
    split = describe(call, server, "photos")["workerSplit"]
    assert split["chosenBy"] == "calibration" and split["reason"].startswith("measured "), split
    import io

    from PIL import Image

    picture = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(picture, format="JPEG")
    reply = call("POST", server.url() + "/predictions/photos", body=picture.getvalue())
    assert reply.status == 200 and reply.json() == {"size": [40, 30]}


# Takes 2.5 s a request: well under 1 request/s on 1 worker, so the split hardly matters.
SLOW_HANDLER = """
import time


def handle(data, context):
    if not data:
        return None
    time.sleep(2.5)
    return [{"ok": True} for _ in data]
"""


def test_a_slow_model_is_given_up_on_within_seconds_and_that_is_remembered(
    serve: Any, make_model: Any, call: Any, describe: Any, tmp_path: Path, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "archiver.serving")
    config = SIGNATURE.replace("batchSize: 4", "batchSize: 1")
    folder = make_model("slow", handler_source=SLOW_HANDLER, config_yaml=config)
    first = serve([folder])  # the default responseTimeout (120 s) used to allow 270 s of calibration
    split, described = _split(describe, call, first, "slow")
    assert split["chosenBy"] == "rule" and split["workers"] == 1 == len(described["workers"]), split
    assert "calibration gave up" in split["reason"] and "after its first), under 1)" in split["reason"]
    assert described["loadTimeSeconds"] < 15, described["loadTimeSeconds"]  # was 40 s and more
    said = [r.getMessage() for r in caplog.records]
    assert any('model "slow": calibration gave up, so the rule applies' in m for m in said), said
    [cached] = (tmp_path / "cache" / "calibration").iterdir()
    first.stop()

    second = serve([folder])  # the outcome was remembered: nothing is timed again
    again, described_again = _split(describe, call, second, "slow")
    assert again["chosenBy"] == "cache" and again["workers"] == 1
    assert "calibration gave up" in again["reason"] and cached.name in again["reason"]
    assert described_again["loadTimeSeconds"] < described["loadTimeSeconds"]


def test_a_split_measured_on_a_busy_machine_says_so(
    serve: Any, make_model: Any, call: Any, describe: Any, tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    from archiver.serving.supervisor.calibration import BUSY

    spin = [sys.executable, "-c", "while True: pass"]
    hogs = [subprocess.Popen(spin) for _ in range(cores() + 1)]  # other programs using every core
    try:
        folder = _calibrated(make_model)
        first = serve([folder])
        split, _ = _split(describe, call, first, "linear")
        assert split["chosenBy"] == "calibration", split
        assert "other programs used" in split["reason"] and "a busy machine" in split["reason"], split
        [cached] = (tmp_path / "cache" / "calibration").iterdir()
        assert json.loads(cached.read_text())["others"] > BUSY
        first.stop()
        # still as busy: the figure stands (a start on a much quieter machine would measure again)
        second = serve([folder])
        again, _ = _split(describe, call, second, "linear")
        assert again["chosenBy"] == "cache" and again["workers"] == split["workers"], again
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_several_workers_are_kept_only_when_they_win_clearly() -> None:
    from archiver.serving.supervisor.calibration import choose
    from archiver.serving.supervisor.calibration_timing import Timing

    one = Timing(rate=100.0, low=90.0, high=110.0, windows=7, others=0.05)
    close = choose(one, Timing(106.0, 100.0, 120.0, 7, 0.05), workers=2, cores_=2)
    assert (close.workers, close.threads) == (1, 2)
    assert "no clear winner" in close.reason and "over 7 and 7 windows" in close.reason
    assert "other programs used 5% of the cores" in close.reason and "busy" not in close.reason
    clear = choose(one, Timing(140.0, 130.0, 150.0, 7, 0.6), workers=2, cores_=2)
    assert (clear.workers, clear.threads) == (2, 1)
    assert "other programs used 60% of the cores (a busy machine" in clear.reason
    unknown = Timing(100.0, 90.0, 110.0, 7, None)  # no /proc to read how busy the machine was
    slower = choose(unknown, Timing(80.0, 70.0, 90.0, 5, None), workers=2, cores_=2)
    assert slower.workers == 1 and "1 worker was faster" in slower.reason and "unknown" in slower.reason


def test_each_pool_holds_its_thread_share_as_a_number_that_follows_the_workers(
    serve: Any, make_model: Any, echo_model: Path, call: Any, describe: Any
) -> None:
    other = make_model("other", handler_source=V2_HANDLER.format(fail=False))
    server = serve([echo_model, other], operator={"workers": 1})
    registry = server.server.registry
    shares = lambda: {e.name: e.pool.batch_threads for e in registry.entries()}  # noqa: E731
    half = max(1, cores() // 2)
    assert shares() == {"echo": half, "other": half}  # a plain int per batch, not worked out per batch
    manage = server.url("management") + "/models"
    assert call("DELETE", manage + "/other", timeout=60).status == 200
    assert shares() == {"echo": cores()}  # its cores went back to echo's worker
    assert call("PUT", manage + "/echo?min_worker=2&synchronous=true", timeout=60).status == 200
    assert shares() == {"echo": half}
    assert call("POST", server.url() + "/predictions/echo", body=b"hi").status == 200


def test_a_model_that_crash_loops_gives_its_cores_back(
    serve: Any, crashy_model: Any, echo_model: Path, call: Any, describe: Any, poll: Any
) -> None:
    from archiver.serving.supervisor.registry import ModelSettings

    crashy, _ = crashy_model("crashy")
    quick = ModelSettings(restart_backoff_s=0.05)
    server = serve([echo_model, crashy], operator={"workers": 1}, defaults=quick)
    echo = server.server.registry.get("echo").pool
    assert echo.batch_threads == max(1, cores() // 2)
    # its handler now crashes on every start: after max_worker_deaths the model is FAILED
    reply = call("POST", server.url() + "/predictions/crashy", body=b"initcrash:exit", timeout=60)
    assert reply.status >= 500
    poll(lambda: describe(call, server, "crashy")["status"] == "FAILED", 60, "crashy FAILED")
    assert echo.batch_threads == cores()  # echo's worker has every core again
    assert call("POST", server.url() + "/predictions/echo", body=b"hi").status == 200


def test_a_handler_that_opens_pictures_is_calibrated_on_a_picture_even_with_a_signature(make_model):
    # An AOTInductor ResNet's archive has a signature (the tensor its preprocess makes) and an image
    # handler: a v2 request of zeros shaped by the signature was refused by that handler, so such a
    # model was never calibrated.
    import json
    from types import SimpleNamespace

    from archiver.serving.supervisor.calibration_example import example_and_key

    picture = make_model("pictures", handler_source=PICTURE_HANDLER, config_yaml=SIGNATURE)
    tensors = _calibrated(make_model, "tensors")
    found = {}
    for folder in (picture, tensors):
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
        request, _ = example_and_key(SimpleNamespace(source=folder, manifest=manifest, signature=None))
        found[folder.name] = b"".join(body for _, body, _ in request.parts)
    assert found["pictures"].startswith(b"\x89PNG")
    assert not found["tensors"].startswith(b"\x89PNG") and found["tensors"]
