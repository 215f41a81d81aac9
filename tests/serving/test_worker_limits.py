"""A model whose workers keep dying while starting: after max_worker_deaths such endings it is FAILED,
answers 503 at once and says why (the signal named), while the other model keeps answering; scaling
it, or registering it again once fixed, brings it back. Stopping the server leaves no worker process
behind. (Endings while a batch runs never fail a model: tests/serving/test_failed_policy.py.)"""

from __future__ import annotations

import os
import time

import pytest

from archiver.serving.supervisor.registry import ModelSettings

pytestmark = pytest.mark.slow

CRASH_LOOP = ModelSettings(restart_backoff_s=0.1, max_worker_deaths=3)


def refused_at_once(call, url: str, body: str = "hello") -> dict:
    started = time.monotonic()
    reply = call("POST", url, body, timeout=30)
    assert reply.status == 503, reply.body
    assert time.monotonic() - started < 2
    return reply.json()


def test_a_crash_loop_fails_the_model_naming_the_signal_and_scaling_it_brings_it_back(
    serve, crashy_model, background_load, call, poll, describe, counted
):
    crashy, marker = crashy_model("crashy")
    steady, _ = crashy_model("steady")
    server = serve([crashy, steady], defaults=CRASH_LOOP)
    predict = server.url() + "/predictions/"
    pids = [w["pid"] for m in ("crashy", "steady") for w in describe(call, server, m)["workers"]]

    with background_load(predict + "steady") as load:
        load.wait_for(5)
        # The handler breaks its own model for good (the marker), then crashes: the ending in the batch
        # does not count, every restart then crashes in initialize, and the third of those fails it.
        reply = call("POST", predict + "crashy", "initcrash:segv", timeout=60)
        assert reply.status == 500 and reply.json()["type"] == "WorkerDiedError", reply.body
        assert "died (SIGSEGV) while handling a batch of 1" in reply.json()["message"]
        poll(lambda: describe(call, server, "crashy")["status"] == "FAILED", timeout=60, what="FAILED")
        error = refused_at_once(call, predict + "crashy")
        assert error["type"] == "ServiceUnavailableError"
        assert error["message"].startswith(
            'model "crashy" failed: its workers ended 3 times within 60 s while idle or starting '
            '(a crash loop); the last: worker 1 of model "crashy" died (SIGSEGV) while loading'
        )
        load.wait_for(5)

        failed = describe(call, server, "crashy")
        assert failed["status"] == "FAILED" and failed["workers"] == []
        assert "crash loop" in failed["loadError"] and "SIGSEGV" in failed["loadError"]
        deaths = failed["deaths"]
        assert [(d["cause"], d["worker"], d["during"]) for d in deaths] == [
            ("SIGSEGV", "1", "batch"),
            *[("SIGSEGV", "1", "start")] * 3,
        ]
        assert all(set(d) == {"time", "worker", "pid", "cause", "message", "during"} for d in deaths)
        assert all("died (SIGSEGV)" in d["message"] for d in deaths)
        dead = [d["pid"] for d in deaths]
        assert len(set(dead)) == 4 and dead[0] == pids[0]
        poll(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in dead), what="dead workers reaped")
        assert counted(call, server, "model_archiver_worker_deaths_total", "crashy") == {"SIGSEGV": 4}
        assert counted(call, server, "model_archiver_worker_restarts_total", "crashy") == {"SIGSEGV": 3}

        marker.unlink()  # the fix
        scaled = call("PUT", f"{server.url('management')}/models/crashy?min_worker=1", timeout=120)
        assert scaled.status == 200, scaled.body
        back = describe(call, server, "crashy")
        assert back["status"] == "READY" and back["loadError"] is None
        again = call("POST", predict + "crashy", "hello", timeout=60)
        assert again.status == 200 and again.json()["echo"] == "hello"
        assert again.json()["pid"] == back["workers"][0]["pid"]
        load.wait_for(5)
    assert load.failures == [], load.failures[:5]
    assert describe(call, server, "steady")["deaths"] == []

    live = [w["pid"] for m in ("crashy", "steady") for w in describe(call, server, m)["workers"]]
    assert len(live) == 2 and pids[1] in live
    server.stop()
    assert not [pid for pid in live if os.path.exists(f"/proc/{pid}")], "workers outlived the server"


def test_a_model_that_crashes_in_initialize_every_time_fails_and_registering_it_again_brings_it_back(
    serve, crashy_model, background_load, call, poll, describe, counted
):
    crashy, marker = crashy_model("crashy")
    steady, _ = crashy_model("steady")
    server = serve([crashy, steady], defaults=CRASH_LOOP, model_store=crashy.parent)
    predict, manage = server.url() + "/predictions/", server.url("management")

    with background_load(predict + "steady") as load:
        load.wait_for(5)
        # The handler breaks its own model for good (the marker), then aborts: every restart aborts
        # in initialize, until the third ending fails the model.
        reply = call("POST", predict + "crashy", "initcrash:abort", timeout=60)
        assert reply.status == 500 and "died (SIGABRT) while handling a batch" in reply.json()["message"]
        poll(lambda: describe(call, server, "crashy")["status"] == "FAILED", timeout=60, what="FAILED")
        failed = describe(call, server, "crashy")
        assert [d["cause"] for d in failed["deaths"]] == ["SIGABRT"] * 4
        assert [d["during"] for d in failed["deaths"]] == ["batch", "start", "start", "start"]
        assert "died (SIGABRT) while loading" in failed["deaths"][-1]["message"]
        assert "crash loop" in failed["loadError"] and "SIGABRT" in failed["loadError"]
        assert "failed: its workers ended 3 times" in refused_at_once(call, predict + "crashy")["message"]
        assert counted(call, server, "model_archiver_worker_deaths_total", "crashy") == {"SIGABRT": 4}

        marker.unlink()  # the fix
        registered = call("POST", f"{manage}/models?url=crashy", timeout=120)  # over the FAILED version
        assert registered.status == 200, registered.body
        back = describe(call, server, "crashy")
        assert back["status"] == "READY" and back["deaths"] == [] and len(back["workers"]) == 1
        again = call("POST", predict + "crashy", "hello", timeout=60)
        assert again.status == 200 and again.json()["echo"] == "hello"
        load.wait_for(5)
    assert load.failures == [], load.failures[:5]
