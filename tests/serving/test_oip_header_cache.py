"""A binary v2 request's JSON header is parsed and checked once and kept (``oip._templates``): a later
request with the same header must give what a first parse gives, with the same checks on its data.
Also the worker's batch path (``oip_worker.answer_v2_bodies``) when one request of a batch does not parse."""

from __future__ import annotations

import json
import struct

import pytest

from archiver.errors import TensorRequestError
from archiver.serving.protocols import oip


def binary_request(inputs: list[tuple[str, str, list[int], bytes]], **head: object) -> tuple[bytes, int]:
    specs = [
        {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
        for n, d, s, b in inputs
    ]
    text = json.dumps({**head, "inputs": specs}).encode()
    return text + b"".join(b for *_, b in inputs), len(text)


def as_tuple(request: oip.V2Request) -> tuple:
    return (
        request.id,
        [(i.name, i.datatype, i.shape, i.data, i.parameters, i.text) for i in request.inputs],
        None if request.outputs is None else [(o.name, o.binary, o.parameters) for o in request.outputs],
        request.parameters,
    )


@pytest.fixture(autouse=True)
def no_kept_headers():
    oip._templates.clear()
    yield
    oip._templates.clear()


def test_a_kept_header_gives_what_a_first_parse_gives() -> None:
    head = {"parameters": {"binary_data_output": True}, "outputs": [{"name": "y"}]}
    first_body, length = binary_request([("x", "FP32", [1, 2], struct.pack("<2f", 1, 2))], **head)
    second_body, _ = binary_request([("x", "FP32", [1, 2], struct.pack("<2f", 3, 4))], **head)
    first = oip.parse_infer_request(first_body, length)
    assert len(oip._templates) == 1
    second = oip.parse_infer_request(second_body, str(length))
    oip._templates.clear()
    assert as_tuple(second) == as_tuple(oip.parse_infer_request(second_body, length))
    assert second.inputs[0].data == struct.pack("<2f", 3, 4) and first.inputs[0].data != second.inputs[0].data


def test_requests_from_a_kept_header_share_nothing_mutable() -> None:
    body, length = binary_request(
        [("x", "INT32", [2], struct.pack("<2i", 1, 2))], parameters={"a": 1}, outputs=[{"name": "y"}]
    )
    one = oip.parse_infer_request(body, length)
    two = oip.parse_infer_request(body, length)
    three = oip.parse_infer_request(body, length)
    two.parameters["a"] = 2
    two.inputs[0].shape.append(9)
    two.outputs[0].parameters["b"] = 1
    assert as_tuple(three) == as_tuple(one)


def test_kept_headers_hold_no_tensor_data() -> None:
    body, length = binary_request([("x", "UINT8", [4096], bytes(4096))])
    oip.parse_infer_request(body, length)
    ((template, sizes),) = oip._templates.values()
    assert sizes == [4096] and template.inputs[0].data == b""


def test_bytes_elements_are_still_checked_per_request() -> None:
    good = struct.pack("<I", 3) + b"abc"
    body, length = binary_request([("t", "BYTES", [1], good)])
    assert oip.parse_infer_request(body, length).inputs[0].data == good
    bad = struct.pack("<I", 5) + b"abc"  # the same size, so the same header, but a length past its data
    with pytest.raises(TensorRequestError, match="runs past its data"):
        oip.parse_infer_request(body[:length] + bad, length)


def test_the_same_header_with_more_or_less_binary_data_is_refused() -> None:
    body, length = binary_request([("x", "FP32", [2], struct.pack("<2f", 1, 2))])
    oip.parse_infer_request(body, length)
    with pytest.raises(TensorRequestError, match="runs past the end"):
        oip.parse_infer_request(body[:-4], length)
    with pytest.raises(TensorRequestError, match="follow the last binary input"):
        oip.parse_infer_request(body + b"xxxx", length)
    with pytest.raises(TensorRequestError, match="header length is wrong"):
        oip.parse_infer_request(body[: length - 1], length)


def test_json_data_and_errors_are_not_kept() -> None:
    oip.parse_infer_request(
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode()
    )
    body, length = binary_request([("x", "FP32", [3], struct.pack("<2f", 1, 2))])
    with pytest.raises(TensorRequestError, match="needs 12 bytes"):
        oip.parse_infer_request(body, length)
    assert not oip._templates


def test_the_kept_headers_are_bounded() -> None:
    for i in range(oip._TEMPLATE_SLOTS + 10):
        body, length = binary_request([("x", "FP32", [1], struct.pack("<f", 1))], parameters={"n": i})
        assert oip.parse_infer_request(body, length).parameters == {"n": i}
    assert len(oip._templates) == oip._TEMPLATE_SLOTS


def test_a_header_with_an_id_is_not_kept() -> None:
    body, length = binary_request([("x", "FP32", [1], struct.pack("<f", 1))], id="once")
    assert oip.parse_infer_request(body, length).id == "once"
    assert not oip._templates


def test_a_batch_with_a_request_that_does_not_parse_runs_the_others_in_order() -> None:
    from archiver.serving.protocols.records import InferenceRequest, InferenceResponse
    from archiver.serving.protocols.wire import to_inference_request
    from archiver.serving.worker.oip_worker import answer_v2_bodies

    good, length = binary_request([("x", "FP32", [1], struct.pack("<f", 1))])
    bad = good[:length] + b"xx"  # two bytes where four are declared
    raws = [
        oip.body_raw_request(good, str(length), "a"),
        oip.body_raw_request(bad, str(length), "b"),
        to_inference_request(oip.body_raw_request(good, str(length), "c")),
    ]
    requests = [to_inference_request(r) if not isinstance(r, InferenceRequest) else r for r in raws]
    requests.append(InferenceRequest("d", {"body": b"plain"}, {}))
    seen: list[str] = []

    def handle(batch: list[InferenceRequest]) -> list[InferenceResponse]:
        seen.extend(r.request_id for r in batch)
        return [InferenceResponse(body=r.request_id.encode(), content_type="text/plain") for r in batch]

    answers = answer_v2_bodies(requests, handle, "m", None)
    assert seen == ["a", "c", "d"]
    assert [a.status for a in answers] == [200, 400, 200, 200]
    assert "runs past the end" in answers[1].message
    assert answers[3].body == b"d"  # not a v2 request: its answer as the handler gave it
    for answer, rid in ((answers[0], "a"), (answers[2], "c")):  # the handler's text, a BYTES output
        body = json.loads(answer.body)  # the client did not ask for binary outputs
        assert body["model_name"] == "m" and body["outputs"][0]["datatype"] == "BYTES"
        assert body["outputs"][0]["data"] == [rid]
