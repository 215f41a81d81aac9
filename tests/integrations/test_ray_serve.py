"""Archives on a real local Ray Serve: `serve run` with our application builder, the seed's ResNet34 on
two replicas (one SIGKILLed under load), and a two-version echo model behind the router."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as triton
import yaml

pytestmark = pytest.mark.slow
MODEL_ARCHIVER = Path(sys.executable).parent / "model-archiver"


def deploy_ray(tmp: Path, *args: str) -> dict:
    """``model-archiver deploy ray ARGS`` (the console script) and the config it wrote."""
    out = tmp / f"config-{len(list(tmp.glob('config-*')))}.yaml"
    command = [str(MODEL_ARCHIVER), "deploy", "ray", *args, "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(out.read_text())


@pytest.fixture(scope="module")
def ray_engine(tmp_path_factory, kit, seed_archive, echo_archives, tensor_archive):
    """One Ray running what `model-archiver deploy ray` wrote, as two applications: `resnet` (the seed
    archive alone, so its deployment is the ingress: 2 replicas, batches of up to 4) and `mixed` (echo
    1.0 and 2.0 and a tensor model behind the router, under /mixed)."""
    tmp = tmp_path_factory.mktemp("ray")
    resnet = deploy_ray(
        tmp,
        str(seed_archive),
        "--app-name",
        "resnet",
        "--replicas",
        "2",
        "--batch-size",
        "4",
        "--max-batch-delay",
        "50",
    )
    mixed = deploy_ray(tmp, *map(str, echo_archives), str(tensor_archive), "--app-name", "mixed")
    mixed["applications"][0]["route_prefix"] = "/mixed"
    engine = kit.start_ray(tmp, {"applications": resnet["applications"] + mixed["applications"]})
    yield engine
    killed = engine.stop()
    assert not engine.processes(), "Ray processes outlived `serve run`"
    print(f"after SIGINT to serve run, killed: {killed}")


def replica_pids(engine, app: str, deployment: str) -> set[int]:
    title = f"ray::ServeReplica:{app}:{deployment}"
    pids = set()
    for proc in engine.processes():
        try:
            if " ".join(proc.cmdline()).startswith(title):
                pids.add(proc.pid)
        except psutil.Error:
            continue
    return pids


def test_two_resnet_replicas_answer_concurrent_kittens_in_batches(ray_engine, kit, kitten_bytes, seed_labels):
    assert len(replica_pids(ray_engine, "resnet", "resnet34")) == 2
    url = ray_engine.url + "/predictions/resnet34"

    def one(_: int):
        return kit.http("POST", url, kitten_bytes, {"Content-Type": "image/jpeg"})

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(one, range(48)))
    assert [r.status for r in replies] == [200] * 48, [r.body[:200] for r in replies if r.status != 200]
    for reply in replies:
        answer = reply.json()
        assert set(answer) == {"label", "index"}
        assert answer["label"] == seed_labels[str(answer["index"])][1]
    assert len({r.body for r in replies}) == 1  # one photo, one model: one answer
    sizes = [int(r.headers["x-archiver-batch-size"]) for r in replies]
    assert max(sizes) > 1 and max(sizes) <= 4, sizes

    # The same photo as a multipart form field, as TorchServe's curl examples send it.
    boundary = "kitten-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="k.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + kitten_bytes
        + f"\r\n--{boundary}--\r\n".encode()
    )
    form = kit.http("POST", url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert form.status == 200 and form.body == replies[0].body


def test_ping_and_errors_are_torchserve_json(ray_engine, kit):
    assert kit.http("GET", ray_engine.url + "/ping").json() == {"status": "Healthy"}
    missing = kit.http("POST", ray_engine.url + "/predictions/nope", b"x")
    assert missing.status == 404 and missing.json()["type"] == "ModelNotFoundError"
    bad = kit.http("POST", ray_engine.url + "/predictions/resnet34", b"not an image")
    assert bad.status >= 400 and set(bad.json()) == {"code", "type", "message"}


def test_router_serves_both_versions_and_the_open_inference_routes(ray_engine, kit):
    base = ray_engine.url + "/mixed"
    text = {"Content-Type": "text/plain"}
    first = kit.http("POST", base + "/predictions/echo", b"hi", text)
    assert first.json() == {"echo": "hi", "version": "1.0", "batch": 1}
    assert kit.http("POST", base + "/predictions/echo/2.0", b"hi", text).json()["version"] == "2.0"
    assert kit.http("POST", base + "/predictions/echo/3.0", b"hi", text).status == 404

    v1 = kit.http(
        "POST",
        base + "/v1/models/echo:predict",
        json.dumps({"instances": ["a", {"b64": base64.b64encode(b"b").decode()}]}).encode(),
        {"Content-Type": "application/json"},
    )
    assert v1.status == 200, v1.body
    assert [p["echo"] for p in v1.json()["predictions"]] == ["a", "b"]

    infer = {"id": "r1", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}
    v2 = kit.http("POST", base + "/v2/models/echo/versions/2.0/infer", json.dumps(infer).encode())
    assert v2.status == 200, v2.body
    answer = v2.json()
    assert answer["id"] == "r1" and answer["model_version"] == "2.0"
    assert json.loads(answer["outputs"][0]["data"][0])["version"] == "2.0"
    broken = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0]}]}
    refused = kit.http("POST", base + "/v2/models/echo/infer", json.dumps(broken).encode())
    assert refused.status == 400 and "2 elements" in refused.json()["error"]
    assert kit.http("GET", base + "/v2/health/ready").json() == {"ready": True}
    meta = kit.http("GET", base + "/v2/models/echo").json()
    assert meta["versions"] == ["1.0", "2.0"] and meta["inputs"] == kit.echo_inputs


def test_tritonclient_binary_tensors_through_the_router(ray_engine):
    rows = np.array([[1, 2, 3, 4], [-1, 0.5, 0, 2]], dtype=np.float32)
    client = triton.InferenceServerClient(
        ray_engine.url.removeprefix("http://") + "/mixed", network_timeout=60
    )
    try:
        tensor = triton.InferInput("input-0", [2, 4], "FP32")
        tensor.set_data_from_numpy(rows, binary_data=True)
        result = client.infer("doubler", [tensor], request_id="ray-1")
        metadata = client.get_model_metadata("doubler")
    finally:
        client.close()
    assert result.get_response()["id"] == "ray-1"
    np.testing.assert_allclose(result.as_numpy("output-0"), rows * 2 + 1)
    assert metadata["platform"] == "pytorch_torchscript"


def test_a_sigkilled_replica_costs_only_its_requests_and_is_replaced(ray_engine, kit, kitten_bytes):
    url = ray_engine.url + "/predictions/resnet34"
    before = replica_pids(ray_engine, "resnet", "resnet34")
    assert len(before) == 2
    statuses: list[int | str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                status: int | str = kit.http("POST", url, kitten_bytes, {"Content-Type": "image/jpeg"}).status
            except OSError as exc:
                status = repr(exc)
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        kit.wait_for(lambda: len(statuses) >= 20, 120, "answers before the kill")
        victim = min(before)
        psutil.Process(victim).send_signal(signal.SIGKILL)
        killed_at = len(statuses)

        def replaced() -> bool:
            now = replica_pids(ray_engine, "resnet", "resnet34")
            return len(now) == 2 and victim not in now

        kit.wait_for(replaced, 180, "Ray to start a replacement replica")
        # The load goes on after the replacement: 40 more answers, whichever replica gives them.
        goal = len(statuses) + 40
        kit.wait_for(lambda: len(statuses) >= goal, 180, "answers after the replacement")
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    after_kill = statuses[killed_at:]
    failures = [s for s in after_kill if s != 200]
    print(f"{len(statuses)} requests, {len(after_kill)} after the kill, failures: {failures}")
    assert all(s == 200 for s in statuses[:killed_at])
    # At most the requests the dead replica held (its max_ongoing_requests, 8) fail, each with a 5xx.
    assert len(failures) <= 8, failures
    assert all(isinstance(s, int) and s >= 500 for s in failures), failures
    assert after_kill.count(200) >= 40
    new = replica_pids(ray_engine, "resnet", "resnet34") - before
    assert new, "no replacement replica"
