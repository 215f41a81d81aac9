"""Handlers that crash, hang, bloat and chatter in their worker processes, each while another model is
under load: the crashed model's batch gets its 5xx, its worker comes back, and neither the server nor
the other model notices. The handler is conftest's CRASHY_HANDLER; the request body picks the failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from archiver.serving.front.server import ServerSettings, ServerThread
from archiver.serving.supervisor.registry import ModelSettings

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Failure:
    model: str  # a model of its own, registered on the shared server for this case
    body: str
    status: int
    error_type: str | None  # None: the request succeeds
    message: str  # a regular expression the error message must match, after .format(model=, limit=)
    causes: tuple[str, ...] = ()  # the deaths GET /models/{model} then lists, in order
    query: str = ""  # registration settings; {limit}: a loaded worker's RSS + 300 MB


def died(how: str, stderr: str = "") -> str:
    doing = "while handling a batch of 1; its last stderr lines: "
    return rf'^worker 1 of model "{{model}}" died \({how}\) {doing}.*{stderr}'


FAILURES = {
    "segfault": Failure("segv", "segv", 500, "WorkerDiedError", died("SIGSEGV"), ("SIGSEGV",)),
    "abort": Failure("abort", "abort", 500, "WorkerDiedError", died("SIGABRT"), ("SIGABRT",)),
    "os._exit": Failure(
        "exit3", "exit3", 500, "WorkerDiedError", died("exit code 3", "crashing: exit$"), ("exit",)
    ),
    "sys.exit": Failure(
        "sysexit", "sysexit", 500, "HandlerError", r"^handler called sys\.exit\(7\) while handling a batch$"
    ),
    "endless loop": Failure(
        "loop",
        "loop",
        504,
        "RequestTimeoutError",
        r'^model "loop" did not answer within 1\.5 s \(responseTimeout\); worker 1 was stopped and is being '
        r"replaced$",
        ("timeout",),
        query="response_timeout=1.5",
    ),
    "memory": Failure(
        "grow",
        "grow:600",
        500,
        "WorkerDiedError",
        r'^worker 1 of model "grow" was stopped \(memory \d+ MB RSS over its limit of {limit} MB\) while '
        r"handling a batch of 1",
        ("memory",),
        query="worker_memory_limit={limit}",
    ),
    "crash in initialize": Failure(
        "initcrash",
        "initcrash:segv:once",
        500,
        "WorkerDiedError",
        died("SIGSEGV"),
        ("SIGSEGV", "SIGSEGV"),
    ),
    "megabytes to stdout": Failure("chatty", "print:8", 200, None, ""),
}


def describe(http, server, model: str) -> dict:
    reply = http("GET", f"{server.url('management')}/models/{model}", timeout=10)
    assert reply.status == 200, reply.body
    return reply.json()[0]


def metric_samples(http, server, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named ``name`` on the server's /metrics page."""
    text = http("GET", server.url("metrics") + "/metrics", timeout=10).body.decode()
    return [
        (s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    ]


def gone(pid: int) -> bool:
    """The process has ended (a zombie counts: it runs nothing, and reaping it is its parent's job)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def shared(tmp_path_factory, serving_kit):
    """One server for every case, with the model "steady" that must never notice; each case registers
    its own crashy model through the management API. Stopping it must leave no worker behind."""
    root = tmp_path_factory.mktemp("workers")
    steady, _ = serving_kit.write_crashy_model(root, "steady")
    for name in {f.model for f in FAILURES.values()} | {"where", "batched", "victim"}:
        serving_kit.write_crashy_model(root, name)
    settings = ServerSettings(
        port=0,
        management_port=0,
        metrics_port=0,
        models=[(None, steady)],
        defaults=ModelSettings(restart_backoff_s=0.1),
        model_store=root / "models",
        cache_dir=root / "cache",
    )
    server = ServerThread(settings).start()
    (worker,) = describe(serving_kit.http, server, "steady")["workers"]
    yield SimpleNamespace(server=server, root=root, steady_worker=worker)
    server.stop()
    assert not os.path.exists(f"/proc/{worker['pid']}"), "a worker outlived the server"


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_a_misbehaving_handler_costs_its_own_batch_and_nothing_else(
    failure, shared, background_load, call, poll, caplog
):
    caplog.set_level(logging.INFO, logger="archiver.worker")
    server, name = shared.server, failure.model
    predict = server.url() + "/predictions/"
    # The same handler's worker, loaded (torch included), plus room to work.
    limit = round(shared.steady_worker["rssMB"]) + 300
    query = failure.query.format(limit=limit)
    registered = call("POST", f"{server.url('management')}/models?url={name}&{query}", timeout=120)
    assert registered.status == 200, registered.body
    (first,) = describe(call, server, name)["workers"]

    with background_load(predict + "steady") as load:
        load.wait_for(5)
        started = time.monotonic()
        reply = call("POST", predict + name, failure.body, timeout=60)
        answered_in = time.monotonic() - started
        assert reply.status == failure.status, reply.body
        assert answered_in < 10
        if failure.error_type is not None:
            error = reply.json()
            assert (error["code"], error["type"]) == (failure.status, failure.error_type)
            pattern = failure.message.format(model=name, limit=limit)
            assert re.search(pattern, error["message"]), error["message"]
        if failure.status == 504:
            assert answered_in >= 1.5, "504 before its responseTimeout ran out"
        # Sent at once, so it waits in the queue through the backoff and the restart(s).
        again = call("POST", predict + name, "hello", timeout=60)
        assert again.status == 200, again.body
        assert again.json()["echo"] == "hello"
        load.wait_for(5)

    assert load.failures == [], load.failures[:5]
    assert call("GET", server.url() + "/ping", timeout=10).status == 200
    crashed = describe(call, server, name)
    assert crashed["status"] == "READY" and crashed["loadError"] is None
    assert tuple(d["cause"] for d in crashed["deaths"]) == failure.causes
    (now,) = crashed["workers"]
    assert again.json()["pid"] == now["pid"]
    if failure.causes:
        assert now["pid"] != first["pid"], "the worker should have been replaced"
        assert crashed["deaths"][0]["pid"] == first["pid"] and crashed["deaths"][0]["worker"] == "1"
        poll(lambda: not os.path.exists(f"/proc/{first['pid']}"), what="the dead worker reaped")
    else:
        assert now["pid"] == first["pid"], "the worker should have kept serving"
    if failure.body.startswith("initcrash:"):  # the first restart crashed in initialize
        assert "died (SIGSEGV) while loading" in crashed["deaths"][1]["message"]
    calm = describe(call, server, "steady")
    assert calm["deaths"] == [] and [w["pid"] for w in calm["workers"]] == [shared.steady_worker["pid"]]

    expected = {cause: failure.causes.count(cause) for cause in failure.causes}
    for metric in ("model_archiver_worker_deaths_total", "model_archiver_worker_restarts_total"):
        samples = metric_samples(call, server, metric)
        assert {s["cause"]: n for s, n in samples if s["model"] == name} == expected
        assert not [s for s, _ in samples if s["model"] == "steady"]

    if failure.body.startswith("print:"):
        prefix = f"[{name} w1 pid {first['pid']}] "
        printed = [
            r for r in caplog.records if r.name == "archiver.worker" and r.getMessage().startswith(prefix)
        ]
        assert 1000 < len(printed) < 8 * 1024, "the output is logged within its budget, not all of it"

    assert call("DELETE", f"{server.url('management')}/models/{name}", timeout=60).status == 200
    assert not os.path.exists(f"/proc/{now['pid']}"), "an unregistered model's worker lives on"


def test_a_crash_costs_exactly_its_batch_and_the_requests_queued_behind_it_are_answered(shared, call, poll):
    server, manage = shared.server, shared.server.url("management")
    registered = call("POST", f"{manage}/models?url=batched&batch_size=4&max_batch_delay=20", timeout=120)
    assert registered.status == 200, registered.body
    url, replies = server.url() + "/predictions/batched", {}

    def send(body: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: replies.update({body: call("POST", url, body, timeout=60)}))
        thread.start()
        return thread

    def queued() -> int:
        return describe(call, server, "batched")["jobQueueStatus"]["pendingRequests"]

    try:
        threads = [send("sleep:2")]  # holds the worker while the next five queue up, in this order
        poll(lambda: describe(call, server, "batched")["workers"][0]["status"] == "BUSY", what="busy")
        for n, body in enumerate(["segv", "a", "b", "c", "d"], start=1):
            threads.append(send(body))
            poll(lambda n=n: queued() == n, what=f"{n} queued")
        for thread in threads:
            thread.join(60)
        assert {body: r.status for body, r in replies.items()} == {
            "sleep:2": 200,  # the batch before the crash
            "segv": 500,  # the crashed batch: the first four in the queue
            "a": 500,
            "b": 500,
            "c": 500,
            "d": 200,  # queued behind it: waited for the restart
        }
        assert "died (SIGSEGV) while handling a batch of 4" in replies["a"].json()["message"]
        assert replies["d"].json()["pid"] != replies["sleep:2"].json()["pid"]
    finally:
        call("DELETE", f"{manage}/models/batched", timeout=60)


def test_a_worker_killed_from_outside_costs_only_the_batch_it_held(shared, call, poll):
    """The OOM killer's SIGKILL: a busy worker's batch gets its 500; an idle worker's death costs no
    request, even one sent the moment after (it waits for the restart)."""
    server, manage = shared.server, shared.server.url("management")
    assert call("POST", f"{manage}/models?url=victim", timeout=120).status == 200
    url = server.url() + "/predictions/victim"

    def ready_pid() -> int:
        workers = poll(
            lambda: [w for w in describe(call, server, "victim")["workers"] if w["status"] == "READY"],
            what="a READY worker",
        )
        return workers[0]["pid"]

    try:
        busy, replies = ready_pid(), []
        slow = threading.Thread(target=lambda: replies.append(call("POST", url, "sleep:5", timeout=60)))
        slow.start()
        poll(lambda: describe(call, server, "victim")["workers"][0]["status"] == "BUSY", what="busy")
        os.kill(busy, signal.SIGKILL)
        slow.join(30)
        assert replies[0].status == 500
        assert "died (SIGKILL) while handling a batch of 1" in replies[0].json()["message"]

        idle = ready_pid()
        os.kill(idle, signal.SIGKILL)
        reply = call("POST", url, "hello", timeout=60)
        assert reply.status == 200, reply.body
        deaths = describe(call, server, "victim")["deaths"]
        assert [(d["pid"], d["cause"]) for d in deaths] == [(busy, "SIGKILL"), (idle, "SIGKILL")]
        assert "died (SIGKILL) while idle" in deaths[1]["message"]
    finally:
        call("DELETE", f"{manage}/models/victim", timeout=60)


def test_a_segfault_message_shows_where_the_handler_crashed(shared, call):
    """The death message's stderr lines should say what the user needs: the fatal error and the
    handler's own frame, not only the interpreter's outermost frames."""
    server = shared.server
    registered = call("POST", f"{server.url('management')}/models?url=where", timeout=120)
    assert registered.status == 200, registered.body
    try:
        message = call("POST", server.url() + "/predictions/where", "segv", timeout=60).json()["message"]
        assert "Fatal Python error: Segmentation fault" in message
        assert 'handler.py", line' in message
    finally:
        call("DELETE", f"{server.url('management')}/models/where", timeout=60)


def test_a_worker_reports_its_process_memory_and_state(shared, call, poll):
    server, (steady,) = shared.server, [shared.steady_worker]
    assert psutil.Process(steady["pid"]).ppid() == os.getpid()  # a child of the server's process
    assert steady["id"] == "1" and steady["gpu"] is False and steady["loadTimeSeconds"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", steady["startTime"])
    slow = threading.Thread(target=call, args=("POST", server.url() + "/predictions/steady", "sleep:1"))
    slow.start()
    busy = poll(
        lambda: [w for w in describe(call, server, "steady")["workers"] if w["status"] == "BUSY"],
        what="the worker BUSY with the slow request",
    )
    slow.join(30)
    (worker,) = busy
    rss = psutil.Process(worker["pid"]).memory_info().rss
    assert 0.8 * rss < worker["memoryUsage"] < 1.25 * rss
    assert worker["rssMB"] == round(worker["memoryUsage"] / 2**20, 1)
    (gauge,) = [
        value
        for labels, value in metric_samples(call, server, "model_archiver_worker_memory_bytes")
        if labels == {"model": "steady", "version": "1.0", "worker": "1"}
    ]
    assert 0.8 * rss < gauge < 1.25 * rss
    assert [w["status"] for w in describe(call, server, "steady")["workers"]] == ["READY"]


# ---- a real `model-archiver serve` process -------------------------------------------------------
def test_a_segfault_under_model_archiver_serve_spares_the_server_and_sigkill_leaves_no_worker(
    serve_process, crashy_model, background_load, call, poll, tmp_path
):
    crashy, _ = crashy_model("crashy")
    steady, _ = crashy_model("steady")
    proc, ready = serve_process(str(crashy), str(steady))
    assert ready["pid"] == proc.pid and ready["models"] == {"crashy": "READY", "steady": "READY"}
    base = f"http://127.0.0.1:{ready['inference_port']}"
    management = f"http://127.0.0.1:{ready['management_port']}"
    (segfaulted,) = ready["workers"]["crashy"]

    with background_load(base + "/predictions/steady") as load:
        load.wait_for(5)
        started = time.monotonic()
        reply = call("POST", base + "/predictions/crashy", "segv", timeout=60)
        assert reply.status == 500 and time.monotonic() - started < 10
        assert reply.json()["type"] == "WorkerDiedError"
        assert (
            'worker 1 of model "crashy" died (SIGSEGV) while handling a batch of 1' in reply.json()["message"]
        )
        again = call("POST", base + "/predictions/crashy", "hello", timeout=60)  # waits out the 1 s backoff
        assert again.status == 200 and again.json()["echo"] == "hello"
        load.wait_for(5)
    assert load.failures == [], load.failures[:5]
    assert proc.poll() is None and psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
    assert call("GET", base + "/ping", timeout=10).status == 200

    models = {m: call("GET", f"{management}/models/{m}", timeout=10).json()[0] for m in ("crashy", "steady")}
    assert [d["cause"] for d in models["crashy"]["deaths"]] == ["SIGSEGV"]
    workers = [w["pid"] for m in models.values() for w in m["workers"]]
    assert again.json()["pid"] in workers and segfaulted not in workers
    assert all(psutil.Process(pid).ppid() == proc.pid for pid in workers)

    # The server dies while a handler spins in pure Python and the other worker waits for work.
    def spin() -> None:
        with contextlib.suppress(OSError):  # its connection dies with the server
            call("POST", base + "/predictions/crashy", "loop", timeout=60)

    threading.Thread(target=spin, daemon=True).start()
    busy = f"{management}/models/crashy"
    poll(lambda: call("GET", busy, timeout=10).json()[0]["workers"][0]["status"] == "BUSY", what="busy")
    proc.kill()
    proc.wait(30)
    # The lifeline pipe closes with the server: every worker exits by itself, whoever reaps it.
    poll(
        lambda: all(gone(pid) for pid in workers), timeout=20, what="workers gone after the server's SIGKILL"
    )
    assert "Traceback" not in proc.log.read_text()
