"""What may leave the server as a handler's answer (status, headers, content type) and what a client may
read of an exception (one line, no interpreter paths): the two checks every answer passes."""

from __future__ import annotations

import json
import os
import sys

import pytest

from archiver.serving.protocols.answer_checks import checked
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.redaction import public_message, redact_paths


def refused(answer: InferenceResponse) -> str:
    result = checked(answer)
    assert (result.status, result.error_type, result.content_type) == (
        500,
        "HandlerError",
        "application/json",
    )
    assert json.loads(result.body)["message"] == result.message
    return result.message or ""


@pytest.mark.parametrize("status", [0, 99, 101, 199, 600, 1000, True, "200", 200.0])
def test_a_status_no_final_answer_can_have_is_a_500(status):
    assert "is not an HTTP status an answer can have (200-599)" in refused(InferenceResponse(status=status))


@pytest.mark.parametrize(
    ("headers", "content_type", "says"),
    [
        ({"X-Evil": "a\r\nSet-Cookie: x=1"}, None, "holds a line break"),
        ({"X-Evil": "a\x00b"}, None, "holds a line break or control character"),
        ({"X Bad": "v"}, None, "is not an HTTP token"),
        ({b"X-Bytes": "v"}, None, "is not an HTTP token"),
        ({"X-Obj": object()}, None, "holds a object, not text"),
        ({"X-Big": "x" * 70_000}, None, "headers are over 65536 bytes"),
        (["X-List"], None, "its headers are a list"),
        ({}, "text/plain\r\nX-Evil: 1", "is not a single-line string"),
        ({}, b"text/plain", "is not a single-line string"),
    ],
)
def test_a_header_or_content_type_that_would_break_the_response_is_a_500(headers, content_type, says):
    assert says in refused(InferenceResponse(headers=headers, content_type=content_type))


def test_a_sendable_answer_passes_as_it_is_less_what_the_server_frames():
    plain = InferenceResponse(body=b"ok", headers={"X-Score": "0.9"}, content_type="text/plain")
    assert checked(plain) is plain
    framed = checked(InferenceResponse(body=b"hello", headers={"Content-Length": "3", "X-N": 7}))
    assert (framed.status, framed.body, framed.headers) == (200, b"hello", {"X-N": "7"})
    empty = checked(InferenceResponse(status=204, body=b"left over"))
    assert (empty.status, empty.body) == (204, b"")
    assert checked(InferenceResponse(status=302, headers={"Location": "/elsewhere"})).status == 302


def test_an_exception_is_quoted_in_one_line_naming_files_but_never_where_python_lives():
    model_dir = "/srv/cache/ab12"
    text = (
        f"failed in {json.__file__} and {os.__file__}, at {model_dir}/lib/util.py:3, "
        f"{sys.prefix}/lib/python3.11/site-packages/torch/nn/functional.py(12), /etc/secret/config.yaml "
        "and https://example.com/a/b and /ping"
    )
    assert redact_paths(text, model_dir) == (
        "failed in json/__init__.py and os.py, at lib/util.py:3, torch/nn/functional.py(12), "
        "…/config.yaml and https://example.com/a/b and /ping"
    )
    torchscript = RuntimeError(
        "The following operation failed in the TorchScript interpreter.\n"
        "Traceback of TorchScript, original code (most recent call last):\n"
        f"{sys.prefix}/lib/python3.11/site-packages/torch/nn/modules/linear.py(134): forward\n"
        "RuntimeError: mat1 and mat2 must have the same dtype, but got Long and Float\n"
    )
    assert (
        public_message(torchscript)
        == "RuntimeError: mat1 and mat2 must have the same dtype, but got Long and Float"
    )
    assert public_message(ValueError("first line\nsecond line")) == "first line"
    assert public_message(KeyError()) == "KeyError"
