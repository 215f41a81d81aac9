"""One client cannot make a model FAILED: a worker that dies while running a batch may have been killed
by a request, so it costs that batch and a restart with backoff, never the model; a model whose
workers die while idle or while starting is in a crash loop of its own, and still ends FAILED."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from archiver.serving.supervisor.registry import ModelSettings

pytestmark = pytest.mark.slow

# A handler that dies on the request "poison" (os._exit, as a native crash on a crafted input would);
# "break" leaves a marker after which every start of the handler dies a moment after loading, while
# idle (a background thread gone wrong), until the marker is removed.
IDLE_DEATHS = """
import os
import threading
from pathlib import Path

MARKER = Path({marker!r})


class Handler:
    def initialize(self, context):
        if MARKER.exists():
            threading.Timer(0.3, os._exit, (5,)).start()

    def handle(self, data, context):
        answers = []
        for row in data:
            text = bytes(row.get("body") or b"").decode()
            if text == "poison":
                os._exit(3)
            if text == "break":
                MARKER.write_text("broken")
                threading.Timer(0.3, os._exit, (5,)).start()
            answers.append({{"echo": text, "pid": os.getpid()}})
        return answers
"""

POLICY = ModelSettings(restart_backoff_s=0.05, max_worker_deaths=3, worker_death_window_s=60.0)


@pytest.fixture
def idle_deaths(make_model, tmp_path: Path):
    """(a folder archive running IDLE_DEATHS, its marker file)."""
    marker = tmp_path / "broken.marker"
    return make_model("fragile", handler_source=IDLE_DEATHS.format(marker=str(marker))), marker


def test_ten_poison_requests_cost_only_themselves_and_the_model_stays_ready(
    serve, idle_deaths, echo_model, background_load, call, describe, counted
):
    fragile, _ = idle_deaths
    server = serve([fragile, echo_model], defaults=POLICY)
    predict = server.url() + "/predictions/"

    with background_load(predict + "echo") as load:
        load.wait_for(5)
        started = time.monotonic()
        for _ in range(10):  # more than three times max_worker_deaths, well within the window
            reply = call("POST", predict + "fragile", "poison", timeout=60)
            assert reply.status == 500, reply.body
            error = reply.json()
            assert error["type"] == "WorkerDiedError"
            assert error["message"].startswith(
                'worker 1 of model "fragile" died (exit code 3) while handling a batch of 1'
            )
            assert describe(call, server, "fragile")["status"] == "READY"
        poisoned_for = time.monotonic() - started
        good = call("POST", predict + "fragile", "hello", timeout=60)
        load.wait_for(5)
    assert good.status == 200 and good.json()["echo"] == "hello", good.body
    assert load.failures == [], load.failures[:5]

    model = describe(call, server, "fragile")
    assert model["status"] == "READY" and model["loadError"] is None
    assert good.json()["pid"] == model["workers"][0]["pid"]
    assert [(d["cause"], d["during"]) for d in model["deaths"]] == [("exit", "batch")] * 10
    # the restarts backed off with the streak (0.05 s x 1, 1, 2, 3, 5, 8, 8, 8, 8 = 2.2 s at least)
    assert poisoned_for >= 2.2
    assert counted(call, server, "model_archiver_worker_deaths_total", "fragile") == {"exit": 10}
    assert counted(call, server, "model_archiver_worker_restarts_total", "fragile") == {"exit": 10}


def test_a_model_whose_workers_die_while_idle_still_fails_and_scaling_it_brings_it_back(
    serve, idle_deaths, echo_model, background_load, call, poll, describe
):
    fragile, marker = idle_deaths
    server = serve([fragile, echo_model], defaults=POLICY)
    predict = server.url() + "/predictions/"

    with background_load(predict + "echo") as load:
        load.wait_for(5)
        assert call("POST", predict + "fragile", "break", timeout=60).status == 200
        poll(lambda: describe(call, server, "fragile")["status"] == "FAILED", timeout=60, what="FAILED")
        started = time.monotonic()
        refused = call("POST", predict + "fragile", "hello", timeout=30)
        assert refused.status == 503 and time.monotonic() - started < 2, refused.body
        assert refused.json()["message"].startswith(
            'model "fragile" failed: its workers ended 3 times within 60 s while idle or starting '
            '(a crash loop); the last: worker 1 of model "fragile" died (exit code 5) while idle'
        )
        load.wait_for(5)

        failed = describe(call, server, "fragile")
        assert failed["workers"] == [] and "crash loop" in failed["loadError"]
        assert [d["during"] for d in failed["deaths"]] == ["idle"] * 3
        dead = [d["pid"] for d in failed["deaths"]]
        poll(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in dead), what="dead workers reaped")

        marker.unlink()  # the fix
        scaled = call("PUT", f"{server.url('management')}/models/fragile?min_worker=1", timeout=120)
        assert scaled.status == 200, scaled.body
        back = call("POST", predict + "fragile", "hello", timeout=60)
        assert back.status == 200 and back.json()["echo"] == "hello", back.body
        load.wait_for(5)
    assert load.failures == [], load.failures[:5]
    assert describe(call, server, "fragile")["status"] == "READY"
    assert describe(call, server, "echo")["deaths"] == []
