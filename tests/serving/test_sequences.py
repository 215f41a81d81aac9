"""Stateful models: TorchServe's sequence batching examples, as a user runs them against a live server.

The handlers below use the API of TorchServe 0.12's ``examples/stateful`` handlers (a running sum per
sequence, kept in the worker; ``get_sequence_id``, the ``header_key_sequence_*`` names, the start and
end headers), written here without the example's model file and LRU package.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from archiver.errors import SequenceError
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor.sequences import SequenceBatcher, SequenceLimits

# TorchServe's sequence_batching handler, by its API: each request adds its number to its sequence's
# running sum. "die:S" ends the worker process after S seconds; "sleep:S:N" works S seconds, then adds N.
STATEFUL_HANDLER = """
import os
import time
from collections import OrderedDict


class StatefulHandler:
    DEFAULT_CAPACITY = 10

    def initialize(self, ctx):
        self.context = ctx
        config = ctx.model_yaml_config.get("handler") or {}
        self.capacity = int(config.get("cache", {}).get("capacity", self.DEFAULT_CAPACITY))
        self.cache = OrderedDict()  # an LRU, as the example's lru-dict
        self.initialized = True

    def handle(self, data, context):
        results = []
        for idx, row in enumerate(data):
            sequence_id = self.context.get_sequence_id(idx)
            prev = int(self.cache.get(sequence_id, 0))
            request = row.get("data") or row.get("body")
            if isinstance(request, (bytes, bytearray)):
                request = request.decode("utf-8")
            if request.startswith("die:"):
                time.sleep(float(request[4:]))
                os._exit(3)
            if request.startswith("sleep:"):
                _, seconds, request = request.split(":")
                time.sleep(float(seconds))
            val = prev + int(request)
            self.cache[sequence_id] = val
            self.cache.move_to_end(sequence_id)
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
            context.set_response_header(idx, "x-worker-pid", str(os.getpid()))
            results.append(val)
        return results
"""

# TorchServe's sequence_continuous_batching handler, by its API: a session opens with the start header
# the server adds to a sequence's first request, 0 closes it (the end header), numbers add up, and each
# request's stopping criterion removes it from the handler's cache once it is answered.
SESSION_HANDLER = """
class SessionHandler:
    def initialize(self, ctx):
        self.context = ctx
        ctx.cache = {}
        self.sums = {}

    def handle(self, data, context):
        results = []
        for idx, row in enumerate(data):
            sequence_id = self.context.get_sequence_id(idx)
            self.context.set_response_header(idx, self.context.header_key_sequence_id, sequence_id)
            if self.context.get_request_header(idx, self.context.header_key_sequence_start):
                self.sums[sequence_id] = 0
                self.context.cache[sequence_id] = {"start": True, "num_requests": 0}
            request = int(row.get("data") or row.get("body"))
            # requests still in the cache: their stopping criteria clean them up (the example's clean_up)
            pending = [key for key in self.context.cache if key not in self.sums]
            self.context.set_response_header(idx, "x-pending-requests", str(len(pending)))
            self.context.cache[self.context.get_request_id(idx)] = {"stream": False}
            self.context.cache[sequence_id]["num_requests"] += 1
            self.sums[sequence_id] += request
            if request == 0:
                self.context.set_response_header(idx, self.context.header_key_sequence_end, sequence_id)
                del self.context.cache[sequence_id]
            results.append(self.sums[sequence_id])
        ids = self.context.request_ids.values()
        self.context.stopping_criteria = [self.criterion(req_id) for req_id in ids]
        return results

    def criterion(self, req_id):
        def stop(answer):
            del self.context.cache[req_id]
            return None  # not a stream

        return stop
"""

STATEFUL_CONFIG = """
minWorkers: 2
maxWorkers: 2
batchSize: 4
maxNumSequence: 4
sequenceMaxIdleMSec: {idle}
maxSequenceJobQueueSize: 10
sequenceBatching: true

handler:
  cache:
    capacity: 4
"""


def stateful(make_model, name="stateful", *, idle=60000, config=None, handler=STATEFUL_HANDLER):
    return make_model(name, handler_source=handler, config_yaml=config or STATEFUL_CONFIG.format(idle=idle))


def send(call, server, value, sequence=None, model="stateful"):
    headers = {"ts_request_sequence_id": sequence} if sequence is not None else {}
    return call("POST", f"{server.url('inference')}/predictions/{model}", str(value), headers)


def test_two_interleaved_sequences_each_keep_their_own_sum_on_their_own_worker(
    serve, make_model, call, describe
):
    server = serve([stateful(make_model)])
    answers: dict[str, list[str]] = {"seq_0": [], "seq_1": []}
    pids: dict[str, set[str]] = {"seq_0": set(), "seq_1": set()}
    for sequence, value in [("seq_0", 1), ("seq_1", 1), ("seq_0", 2), ("seq_1", 2), ("seq_0", 3)]:
        reply = send(call, server, value, sequence)
        assert reply.status == 200, reply.body
        assert reply.headers["ts_request_sequence_id"] == sequence
        answers[sequence].append(reply.body.decode())
        pids[sequence].add(reply.headers["x-worker-pid"])
    # The bug: one shared state answered 1, 2, 4 and 3, 6; TorchServe's semantics:
    assert answers == {"seq_0": ["1", "3", "6"], "seq_1": ["1", "3"]}
    assert len(pids["seq_0"]) == len(pids["seq_1"]) == 1, "a sequence stays on one worker"
    assert pids["seq_0"] != pids["seq_1"], "two sequences on two workers: one each"

    # TorchServe's own test of the example: two clients at once, five requests each.
    def client(sequence: str, values: list[int]) -> str:
        return " ".join(send(call, server, v, sequence).body.decode() for v in values)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client, "seq_a", [1, 3, 5, 7, 9])
        second = pool.submit(client, "seq_b", [2, 4, 6, 8, 10])
        assert first.result() == "1 4 9 16 25"
        assert second.result() == "2 6 12 20 30"
    description = describe(call, server, "stateful")
    assert description["stateful"] is True and description["maxNumSequence"] == 4
    metrics = call("GET", server.url("metrics") + "/metrics").body.decode()
    waited = [line for line in metrics.splitlines() if line.startswith("ts_queue_latency_microseconds{")]
    assert any('model_name="stateful"' in line for line in waited), "queue waits are counted per sequence too"
    assert description["openSequences"] == 4

    # Scaling down retires a worker: its sequences end with a clear error, the other worker's go on.
    scaled = call("PUT", f"{server.url('management')}/models/stateful?min_worker=1&synchronous=true")
    assert scaled.status == 200, scaled.body
    after = {sequence: send(call, server, 4, sequence) for sequence in ("seq_0", "seq_1")}
    ended = [s for s, reply in after.items() if reply.status == 410]
    assert len(ended) == 1, {s: r.body for s, r in after.items()}
    assert "stopped by a scale-down" in after[ended[0]].json()["message"]
    kept = "seq_1" if ended == ["seq_0"] else "seq_0"
    assert after[kept].body == {"seq_0": b"10", "seq_1": b"7"}[kept]


def test_a_session_opens_without_an_id_and_its_handler_closes_it(serve, make_model, call, describe):
    model = stateful(make_model, "session", handler=SESSION_HANDLER)
    server = serve([model])
    opened = send(call, server, 2, model="session")
    assert opened.status == 200 and opened.body == b"2", opened.body
    sid = opened.headers["ts_request_sequence_id"]
    assert sid.startswith("ts-seq-") and len(sid) == len("ts-seq-") + 36
    later = [send(call, server, v, sid, "session") for v in (4, 6)]
    assert [reply.body for reply in later] == [b"6", b"12"]
    assert later[-1].headers["x-pending-requests"] == "0", "each answer ran its stopping criterion"
    closed = send(call, server, 0, sid, "session")
    assert closed.status == 200 and closed.body == b"12"
    assert closed.headers["ts_request_sequence_end"] == sid
    after = send(call, server, 2, sid, "session")
    assert after.status == 410, after.body
    assert after.json()["type"] == "SequenceError"
    assert "ended by its handler" in after.json()["message"]
    assert describe(call, server, "session")["openSequences"] == 0
    # another session is independent of the closed one
    other = send(call, server, 4, model="session")
    assert other.body == b"4" and other.headers["ts_request_sequence_id"] != sid


def test_an_idle_sequence_expires(serve, make_model, call, poll, describe):
    server = serve([stateful(make_model, idle=300)])
    sid = send(call, server, 5).headers["ts_request_sequence_id"]
    assert send(call, server, 1, "mine").body == b"1"
    poll(lambda: describe(call, server, "stateful")["openSequences"] == 0, 30, "idle sequences to expire")
    expired = send(call, server, 1, sid)
    assert expired.status == 410
    assert "idle longer than sequenceMaxIdleMSec (300 ms)" in expired.json()["message"]
    # An id the client chose opens again, on the worker that holds its state (the example's curl by hand).
    assert send(call, server, 2, "mine").body == b"3"


def test_a_dead_worker_ends_its_sequences_with_a_clear_error(serve, make_model, call, poll, describe):
    server = serve([stateful(make_model)])
    assert send(call, server, 1, "doomed").status == 200
    assert send(call, server, 1, "survivor").status == 200
    replies = {}
    dying = threading.Thread(target=lambda: replies.update(dying=send(call, server, "die:1", "doomed")))
    dying.start()
    poll(lambda: workers_busy(call, server), 30, "the dying request to run")
    waiting = send(call, server, 1, "doomed")  # queued behind "die:1" in its sequence
    dying.join(30)
    assert replies["dying"].status == 500
    assert waiting.status == 410, waiting.body
    assert "the state it built is lost" in waiting.json()["message"]
    later = send(call, server, 1, "doomed")
    assert later.status == 410 and "start a new sequence" in later.json()["message"]
    assert send(call, server, 2, "survivor").body == b"3", "the other worker's sequence is untouched"
    poll(lambda: describe(call, server, "stateful")["workers"].__len__() == 2, 60, "the worker's restart")
    assert send(call, server, 7).body == b"7"  # a new sequence works on the restarted pool


def test_hostile_sequence_ids_and_full_queues_get_clear_errors(serve, make_model, call, raw, poll):
    config = STATEFUL_CONFIG.format(idle=60000)
    config = config.replace("minWorkers: 2", "minWorkers: 1").replace("batchSize: 4", "batchSize: 1")
    config = config.replace("maxNumSequence: 4", "maxNumSequence: 2").replace(
        "maxSequenceJobQueueSize: 10", "maxSequenceJobQueueSize: 1"
    )
    server = serve([stateful(make_model, config=config)])
    made_up = send(call, server, 1, "ts-seq-00000000-0000-0000-0000-000000000000")
    assert made_up.status == 404 and "not one this server opened" in made_up.json()["message"]
    for bad in ("has space", "x" * 129, "-leading", "semi;colon"):
        reply = send(call, server, 1, bad)
        assert reply.status == 400, (bad, reply.body)
        assert "ts_request_sequence_id must be" in reply.json()["message"]
    port = int(server.url("inference").rsplit(":", 1)[1])
    huge = b"POST /predictions/stateful HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
    huge += b"ts_request_sequence_id: " + b"a" * 70000 + b"\r\n\r\n1"
    assert raw(port, huge).split(b" ", 2)[1] in (b"400", b"431")

    # maxSequenceJobQueueSize 1: one request running, one waiting, the next is refused
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(send, call, server, "sleep:1.5:1", "busy")
        poll(lambda: workers_busy(call, server), 30, "the slow request to run")
        waiting = pool.submit(send, call, server, 1, "busy")
        poll(lambda: requests_waiting(call, server) == 1, 30, "the second request to wait")
        refused = send(call, server, 1, "busy")
        assert refused.status == 503 and "maxSequenceJobQueueSize 1" in refused.json()["message"]
        # maxNumSequence 2 (batchSize x workers is 1): "busy" and a second one are open, a third is refused
        assert send(call, server, 1, "second").status == 200
        third = send(call, server, 1, "third")
        assert third.status == 503 and "open sequences" in third.json()["message"]
        assert running.result().body == b"1" and waiting.result().body == b"2"


def workers_busy(call, server) -> bool:
    workers = call("GET", f"{server.url('management')}/models/stateful").json()[0]["workers"]
    return any(w["status"] == "BUSY" for w in workers)


def requests_waiting(call, server) -> int:
    return call("GET", f"{server.url('management')}/models/stateful").json()[0]["jobQueueStatus"][
        "pendingRequests"
    ]


# ---- the sequence batcher on its own: coroutines stand in for the workers --------------------------


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def _request(body: str, sequence: str | None = None) -> RawRequest:
    headers = {"ts_request_sequence_id": sequence} if sequence else {}
    return RawRequest(request_id=body, headers=headers, parts=[("body", body.encode(), "text/plain")])


def test_a_batch_holds_one_request_of_each_sequence_in_the_order_sent():
    async def story():
        batcher = SequenceBatcher("m", SequenceLimits(max_num_sequence=4, max_queue=5, max_idle_ms=60000))
        batcher.batch_size = 4
        taker = asyncio.ensure_future(batcher.take(1))  # worker 1 registers and waits for work
        await asyncio.sleep(0)
        sent = [("a1", "a"), ("a2", "a"), ("b1", "b"), ("a3", "a")]
        answers = [asyncio.ensure_future(batcher.submit(_request(b, s))) for b, s in sent]
        batches = []
        for _ in range(3):
            jobs = await taker
            batches.append([job.request.request_id for job in jobs])
            batcher.deliver(jobs, [InferenceResponse(body=job.request.parts[0][1]) for job in jobs])
            taker = asyncio.ensure_future(batcher.take(1))
        taker.cancel()
        return batches, await asyncio.gather(*answers)

    batches, results = _run(story())
    assert batches == [["a1", "b1"], ["a2"], ["a3"]]
    assert [r.body for r in results] == [b"a1", b"a2", b"b1", b"a3"]
    assert [r.headers["ts_request_sequence_id"] for r in results] == ["a", "a", "b", "a"]


def test_the_end_header_closes_several_and_old_sequences_time_out():
    async def story():
        limits = SequenceLimits(max_num_sequence=8, max_queue=2, max_idle_ms=60000, timeout_ms=300)
        batcher = SequenceBatcher("m", limits, batch_size=4)

        async def worker():  # answers every batch; a body "end:IDS" ends those sequences
            while True:
                jobs = await batcher.take(1)
                answers = []
                for job in jobs:
                    body = job.request.parts[0][1].decode()
                    headers = {"ts_request_sequence_end": body[4:]} if body.startswith("end:") else {}
                    answers.append(InferenceResponse(body=body.encode(), headers=headers))
                batcher.deliver(jobs, answers)

        task = asyncio.ensure_future(worker())
        made = (await batcher.submit(_request("open"))).headers["ts_request_sequence_id"]
        await batcher.submit(_request("1", "mine"))
        await batcher.submit(_request("1", "other"))
        assert batcher.open_sequences == 3
        await batcher.submit(_request(f"end:{made}; mine", "other"))
        assert batcher.open_sequences == 1  # "other" itself stays open
        with pytest.raises(SequenceError) as closed:
            await batcher.submit(_request("2", made))
        assert closed.value.http_status == 410 and "ended by its handler" in closed.value.message
        await batcher.submit(_request("2", "mine"))  # a client's id opens again
        assert batcher.open_sequences == 2
        young = (await batcher.submit(_request("3"))).headers["ts_request_sequence_id"]
        while batcher.open_sequences:  # all pass sequenceTimeoutMSec (300 ms); the 30 s guard bounds this
            await asyncio.sleep(0.02)
        with pytest.raises(SequenceError) as expired:
            await batcher.submit(_request("4", young))
        task.cancel()
        return expired.value

    assert "older than sequenceTimeoutMSec (300 ms)" in _run(story()).message


def test_requests_a_gone_worker_held_or_queued_get_its_sequence_error():
    async def story():
        batcher = SequenceBatcher("m", SequenceLimits(max_num_sequence=2, max_queue=3, max_idle_ms=60000))
        taker = asyncio.ensure_future(batcher.take(7))
        await asyncio.sleep(0)
        first = asyncio.ensure_future(batcher.submit(_request("1", "s")))
        second = asyncio.ensure_future(batcher.submit(_request("2", "s")))
        jobs = await taker  # worker 7 holds "1"; "2" waits behind it
        batcher.worker_gone(7, "its worker (7) died: exit code 3")
        batcher.requeue(jobs)  # it never ran it
        return await first, await second

    for answer in _run(story()):
        assert answer.status == 410
        assert "its worker (7) died: exit code 3; the state it built is lost" in answer.message


def test_a_clients_expired_id_does_not_reopen_on_a_worker_that_died_since():
    async def story():
        batcher = SequenceBatcher("m", SequenceLimits(max_num_sequence=2, max_queue=3, max_idle_ms=50))
        taker = asyncio.ensure_future(batcher.take(3))
        await asyncio.sleep(0)
        answer = asyncio.ensure_future(batcher.submit(_request("1", "e")))
        jobs = await taker
        batcher.deliver(jobs, [InferenceResponse(body=b"1")])
        await answer
        while batcher.open_sequences:  # idle past 50 ms: expired (the 30 s guard bounds this)
            await asyncio.sleep(0.01)
        batcher.worker_gone(3, "its worker (3) died: SIGKILL")  # the state "e" would reopen on is gone
        with pytest.raises(SequenceError) as refused:
            await batcher.submit(_request("2", "e"))
        return refused.value

    refused = _run(story())
    assert refused.http_status == 410 and "its worker (3) died: SIGKILL" in refused.message


def test_model_config_sequence_keys_are_checked():
    from archiver.config import parse_model_config
    from archiver.errors import ConfigError, UsageError
    from archiver.serving.supervisor.model_entry import settings_from_model_config

    with pytest.raises(UsageError, match="sequenceBatching needs sequenceMaxIdleMSec > 0"):
        settings_from_model_config(parse_model_config("sequenceBatching: true\n"))
    for text, wanted in (
        ("maxNumSequence: 0", "maxNumSequence must be an integer from 1 to 100000, got 0"),
        ("sequenceMaxIdleMSec: .inf", "sequenceMaxIdleMSec must be a number from 0 to 86400000"),
        ("maxSequenceJobQueueSize: 1000000", "maxSequenceJobQueueSize must be an integer from 1 to 10000"),
        ("sequenceTimeoutMSec: -5", "sequenceTimeoutMSec must be 0 (no limit) or a number from 1"),
    ):
        with pytest.raises(ConfigError, match=wanted.replace("(", r"\(").replace(")", r"\)")):
            parse_model_config(text)
    settings = settings_from_model_config(parse_model_config(STATEFUL_CONFIG.format(idle=10)))
    assert settings["sequence_batching"] is True and settings["max_num_sequence"] == 4
    assert settings["sequence_max_idle_ms"] == 10 and settings["max_sequence_job_queue_size"] == 10
