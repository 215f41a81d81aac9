"""One client cannot make a model FAILED through --worker-memory-limit either (issue 19, item 2): a
request that makes its worker allocate and keep memory is answered, and the worker is stopped for its
memory a moment later, while idle. That ending follows a request the worker answered since the last
memory check, so it counts as the batch's doing: the model backs off and restarts the worker, as for
a crash in the batch, and never fails for it."""

from __future__ import annotations

from archiver.serving.supervisor.registry import ModelSettings

# "poison" makes the worker allocate 150 MB and keep it (a cache that grows on a crafted input).
HOARDER = """
import os

HELD = []


def handle(data, context):
    if not data:
        return None
    answers = []
    for row in data:
        text = bytes(row.get("body") or row.get("data") or b"").decode()
        if text == "poison":
            HELD.append(bytearray(b"\\x01") * (150 * 2**20))
        answers.append({"echo": text, "pid": os.getpid()})
    return answers
"""

POLICY = ModelSettings(
    restart_backoff_s=0.05, max_worker_deaths=3, worker_death_window_s=60.0, worker_memory_limit_mb=100
)


def describe(call, server) -> dict:
    reply = call("GET", f"{server.url('management')}/models/hoarder", timeout=10)
    assert reply.status == 200, reply.body
    return reply.json()[0]


def test_requests_that_keep_memory_cost_their_worker_never_the_model(serve, make_model, call, poll):
    server = serve([make_model("hoarder", handler_source=HOARDER)], defaults=POLICY)
    predict = server.url() + "/predictions/hoarder"
    for n in range(1, 7):  # twice max_worker_deaths, well within the window
        reply = call("POST", predict, "poison", timeout=60)
        # answered, then stopped while idle; or stopped while it allocated, costing this request
        assert reply.status == 200 or "was stopped (memory" in reply.json()["message"], reply.body
        poll(lambda n=n: len(describe(call, server)["deaths"]) >= n, timeout=30, what=f"memory stop {n}")
        assert describe(call, server)["status"] == "READY", describe(call, server)["loadError"]
    good = call("POST", predict, "hello", timeout=60)
    assert good.status == 200 and good.json()["echo"] == "hello", good.body
    model = describe(call, server)
    assert model["status"] == "READY" and model["loadError"] is None
    assert {(d["cause"], d["during"]) for d in model["deaths"]} == {("memory", "batch")}
    assert "over its limit of 100 MB" in model["deaths"][0]["message"]
