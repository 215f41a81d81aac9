"""The front process as a user meets it: small, torch-free, answering while models load; workers apart."""

from __future__ import annotations

import json
import os
import time

from archiver.serving.supervisor.registry import ModelSettings

# Reports the torch threads its worker runs with; loading takes LOAD_S seconds (a big model, say).
THREADS_HANDLER = """
import time

import torch

LOAD_S = {load_s}


def handle(data, context):
    if data is None:
        time.sleep(LOAD_S)
        return None
    return [{{"threads": torch.get_num_threads()}} for _ in data]
"""


def _url(ready: dict, which: str) -> str:
    return f"http://127.0.0.1:{ready[which + '_port']}"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


def test_ping_and_the_management_api_answer_at_once_while_a_model_loads(
    serve_process, make_model, call, poll
):
    slow = make_model("slow", handler_source=THREADS_HANDLER.format(load_s=6))
    proc, urls = serve_process(str(slow), ready=False)
    base, mgmt = urls["inference"], urls["management"]

    started = time.monotonic()
    ping = call("GET", base + "/ping", timeout=5)
    described = call("GET", mgmt + "/models/slow", timeout=5).json()[0]
    assert time.monotonic() - started < 3, "the front waited for the model to load"
    assert ping.status == 503 and ping.json() == {"status": "Loading"}
    assert described["status"] == "LOADING"
    assert [w["status"] for w in described["workers"]] == ["STARTING"]
    assert call("POST", base + "/predictions/slow", b"x", timeout=5).status == 503

    poll(lambda: call("GET", base + "/ping").status == 200, timeout=60, what="model loaded")
    assert call("POST", base + "/predictions/slow", b"x").status == 200


def test_the_front_never_imports_torch_and_stays_small(serve_process, make_model, call):
    model = make_model("threads", handler_source=THREADS_HANDLER.format(load_s=0))
    proc, ready = serve_process(str(model), "--workers", "2")
    base, mgmt = _url(ready, "inference"), _url(ready, "management")
    for _ in range(50):
        assert call("POST", base + "/predictions/threads", b"x").status == 200

    with open(f"/proc/{proc.pid}/maps") as maps:
        assert "libtorch" not in maps.read(), "the front process loaded torch"
    assert _rss_kb(proc.pid) <= 80 * 1024
    workers = call("GET", mgmt + "/models/threads").json()[0]["workers"]
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and proc.pid not in pids
    for pid in pids:
        with open(f"/proc/{pid}/maps") as maps:
            assert "libtorch" in maps.read()  # the handler's torch lives in the workers
    assert all(w["memoryUsage"] > 50 * 2**20 and w["status"] == "READY" for w in workers)


def test_torch_threads_default_to_the_cores_divided_by_all_workers(serve_process, make_model, call):
    model = make_model("threads", handler_source=THREADS_HANDLER.format(load_s=0))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    _, ready = serve_process(str(model), "--workers", "2", env={**env, "MODEL_ARCHIVER_TOKEN": ""})
    url = _url(ready, "inference") + "/predictions/threads"
    # a lone request gets its share or more: the cores other programs leave free (test_thread_follow.py)
    assert max(1, _cores() // 2) <= call("POST", url, b"x").json()["threads"] <= _cores()

    _, ready = serve_process(str(model), "--workers", "2", "--torch-threads", "3")
    assert call("POST", _url(ready, "inference") + "/predictions/threads", b"x").json() == {"threads": 3}


def test_scaling_starts_and_ends_worker_processes(serve, call, poll, echo_model):
    server = serve([echo_model])
    mgmt = server.url("management") + "/models/echo"
    (first,) = [w["pid"] for w in call("GET", mgmt).json()[0]["workers"]]

    assert call("PUT", mgmt + "?min_worker=3").status == 200
    pids = [w["pid"] for w in call("GET", mgmt).json()[0]["workers"]]
    assert len(set(pids)) == 3 and first in pids and all(os.path.exists(f"/proc/{p}") for p in pids)

    assert call("PUT", mgmt + "?min_worker=0").status == 200
    poll(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), what="retired workers to exit")
    refused = call("POST", server.url() + "/predictions/echo", b"x", timeout=5)
    assert refused.status == 503 and "has no workers" in refused.json()["message"]

    assert call("PUT", mgmt + "?min_worker=1").status == 200
    assert call("POST", server.url() + "/predictions/echo", b"x").json()["echo"] == "x"


def test_a_worker_sees_the_request_as_torchserve_would(serve, call, make_model):
    """Bodies cross the process boundary as bytes and are decoded in the worker, TorchServe's way."""
    seen = make_model(
        "seen",
        handler_source="""
        def handle(data, context):
            if data is None:
                return None
            return [
                {k: [type(v).__name__, v if isinstance(v, (str, dict, list)) else bytes(v).hex()]
                 for k, v in row.items()}
                for row in data
            ]
        """,
    )
    server = serve([seen], defaults=ModelSettings())
    url = server.url() + "/predictions/seen"
    assert call("POST", url, b"\x00\xff").json() == {"body": ["bytearray", "00ff"]}
    assert call("POST", url, b'{"a": 1}', {"Content-Type": "application/json"}).json() == {
        "body": ["dict", {"a": 1}]
    }
    assert call("POST", url, "héllo".encode(), {"Content-Type": "text/plain; charset=utf-8"}).json() == {
        "body": ["str", "héllo"]
    }
    form = call("POST", url, b"data=x%26y&n=2", {"Content-Type": "application/x-www-form-urlencoded"})
    assert form.json() == {"data": ["bytearray", b"x&y".hex()], "n": ["bytearray", b"2".hex()]}
    big = bytes(range(256)) * 20000  # 5 MB in one frame each way
    echoed = call("POST", url, big).json()["body"]
    assert echoed[0] == "bytearray" and bytes.fromhex(echoed[1]) == big
    assert json.loads(call("GET", server.url("management") + "/models/seen").body)[0]["status"] == "READY"


def test_a_handler_that_needs_no_torch_gets_a_worker_without_torch(serve, call, echo_model):
    """The echo handler imports only ``handlers.HandlerInputError``: its worker stays a small process."""
    server = serve([echo_model])
    assert call("POST", server.url() + "/predictions/echo", b"hi").json()["echo"] == "hi"
    (worker,) = call("GET", server.url("management") + "/models/echo").json()[0]["workers"]
    with open(f"/proc/{worker['pid']}/maps") as maps:
        assert "libtorch" not in maps.read()
    assert worker["memoryUsage"] < 150 * 2**20
