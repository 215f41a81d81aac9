"""A KServe v1 body's instances are counted from its bytes before any is parsed (issue 19, item 5):
four clients each sending 6.5 MB of ``{"instances": [{}, {}, …]}`` (2.18 million instances) at once
get 413s while the front's memory stays near where it was and /ping keeps answering. The server runs
as a process of its own, so its peak memory (VmHWM) is its own."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psutil
import pytest

from archiver.errors import RequestTooLargeError, TensorRequestError
from archiver.serving.protocols.oip_v1 import parse_v1_request
from tests.serving.conftest import http
from tests.serving.ping_watch import PingWatch

JSON = {"Content-Type": "application/json"}
LIMIT = 6553500  # the default --max-request-size (TorchServe's)


def peak_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def many_empty_objects(size: int) -> bytes:
    head, tail = b'{"instances":[', b"{}]}"
    return head + b"{}," * ((size - len(head) - len(tail)) // 3) + tail


def test_four_bodies_of_millions_of_instances_at_once_are_413s_and_the_front_stays_small(
    serve_process, echo_model
):
    proc, ready = serve_process("--models", f"echo={echo_model}")
    url = f"http://127.0.0.1:{ready['inference_port']}"
    body = many_empty_objects(LIMIT - 100)
    assert len(body) < LIMIT and body.count(b"{}") > 2_000_000
    before = peak_mb(proc.pid)
    replies = []

    def send() -> None:
        replies.append(http("POST", url + "/v1/models/echo:predict", body, JSON, timeout=60))

    with PingWatch(url) as ping:
        senders = [threading.Thread(target=send) for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
    grown = peak_mb(proc.pid) - before
    print(f"front peak memory {before:.0f} MB -> +{grown:.0f} MB; slowest /ping {ping.slowest:.3f} s")
    assert [r.status for r in replies] == [413] * 4, [r.body[:200] for r in replies]
    assert "more v1 instances than the server's limit of 1024" in replies[0].json()["error"]
    # the four bodies themselves are 26 MB; parsed, they were 480 MB more
    assert grown < 120, grown
    assert ping.slowest < 1.0, ping.times
    assert psutil.Process(proc.pid).is_running()
    good = http("POST", url + "/v1/models/echo:predict", json.dumps({"instances": [{"a": 1}, [2]]}), JSON)
    assert good.status == 200 and len(good.json()["predictions"]) == 2


@pytest.mark.parametrize(
    ("body", "count"),
    [
        (b'{"instances": [1, 2, 3]}', 3),
        (b' { "x" : [ {"instances": [9, 9]} , "]" ] , "instances" : [ "a,b" , {"c": [1, 2]} , [] ] } ', 3),
        (b'{"instances": [{}, [], "\\"]", {"k": "\\\\"}]}', 4),
        (b'{"instances": [1], "instances": [1, 2]}', 2),  # as json.loads: the last one counts
    ],
)
def test_the_count_is_the_parsers(body, count):
    assert len(parse_v1_request(body, 1024)) == count
    assert parse_v1_request(body, 1024) == json.loads(body)["instances"]


@pytest.mark.parametrize(
    "body",
    [
        b"[{}, {}]",
        b'"instances"',
        b'{"instances": 5}',
        b'{"instances": []}',
        b'{"instances": [1, 2',
        b'{"instances": ["1]}',
        b'{"instances": [1]} x',
        b'{"instances": [1,]}',
        b'{"other": 1}',
        b"",
    ],
)
def test_a_body_that_is_not_a_v1_request_is_a_400(body):
    with pytest.raises(TensorRequestError):
        parse_v1_request(body, 1024)


def test_instances_past_the_limit_are_refused_whatever_they_hold():
    for instance in (b"0", b"{}", b"[0]", b'{"a": [1, {"b": "]"}]}', b'"x,y"'):
        body = b'{"instances": [' + b",".join([instance] * 11) + b"]}"
        with pytest.raises(RequestTooLargeError, match="more v1 instances than the server's limit of 10"):
            parse_v1_request(body, 10)
        assert len(parse_v1_request(body, 11)) == 11


def test_a_body_of_many_small_containers_is_parsed_whole_and_counted_the_same():
    # 200,000 "[0]" under another key: past the walk's budget, so the parser reads the body
    other = b"[" + b",".join([b"[0]"] * 200_000) + b"]"
    body = b'{"other": ' + other + b', "instances": [[1], [2]]}'
    assert parse_v1_request(body, 1024) == [[1], [2]]
    crowded = b'{"other": ' + other + b', "instances": [' + b",".join([b"[0]"] * 2000) + b"]}"
    with pytest.raises(RequestTooLargeError, match="has 2000 v1 instances, more than the server's limit"):
        parse_v1_request(crowded, 1024)
