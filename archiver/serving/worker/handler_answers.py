"""A handler's answers as responses: exactly one ``InferenceResponse`` per request, whatever it returned.

``LoadedModel`` (``loader.py``) runs the batch; this module turns each answer into the response that
leaves the worker: an exception at an index into that request's error, a status of 400 or more into
an error with the handler's phrase, tensors for Open Inference Protocol rows into tensor bodies,
anything else through TorchServe's encoding (bytes, text, JSON). An answer that cannot be encoded
(not JSON, nested past the recursion limit, a tensor of no protocol datatype) costs its own request a
500, and every response passes ``answer_checks.checked`` (status, headers, content type), so nothing
a handler returns can break the HTTP answer or the worker. Messages name the archive's files only
(``redaction.public_message``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from archiver.errors import ArchiverError, HandlerError
from archiver.serving.protocols.answer_checks import checked
from archiver.serving.protocols.oip import (
    HEADER_LENGTH,
    PROTOCOL_HEADER,
    TENSORS_CONTENT_TYPE,
    OutputsResponse,
    encode_outputs,
)
from archiver.serving.protocols.records import (
    InferenceRequest,
    InferenceResponse,
    encode_answer,
    error_response,
)
from archiver.serving.protocols.redaction import public_message, redact_paths


def failure_response(exc: BaseException, model_dir: Path | str | None) -> InferenceResponse:
    """The error a request gets for ``exc``: an ArchiverError's status and message, else a 500; the
    message one line that names files of the archive only."""
    if isinstance(exc, ArchiverError):
        return error_response(exc.http_status, type(exc).__name__, redact_paths(exc.message, model_dir))
    return error_response(500, type(exc).__name__, public_message(exc, model_dir))


# model-config.yaml's ``handlerErrors``: how a batch the handler failed is answered.
TORCHSERVE_ERRORS = "torchserve"  # TorchServe's: 503 "Prediction failed", 507 out of memory
DETAILED_ERRORS = "detailed"  # ours: 500 with the exception's type and one-line message
_PREDICTION_FAILED = "Prediction failed"
_OUT_OF_RESOURCES = "Out of resources"


def handler_errors_style(raw_config: dict[str, Any] | None, imports_ts: bool) -> str:
    """The style for a model: model-config.yaml's ``handlerErrors`` when set, else TorchServe's for a
    handler written against ``ts`` (it imported a ``ts`` module), ours for the others."""
    chosen = (raw_config or {}).get("handlerErrors")
    if chosen in (TORCHSERVE_ERRORS, DETAILED_ERRORS):
        return chosen
    return TORCHSERVE_ERRORS if imports_ts else DETAILED_ERRORS


def batch_failure_response(exc: BaseException, model_dir: Path | str | None, style: str) -> InferenceResponse:
    """What each request of a batch gets when the handler raised ``exc``.

    TorchServe's style, as its backend and frontend answer: a ``PredictionException`` its own code and
    message; out of memory (MemoryError, a CUDA error) 507 "Out of resources"; any other exception 503
    "Prediction failed"; all typed ``InternalServerException``. Our own errors (a 400 for the request's
    input, a configuration error) keep their status and message in both styles. The log gets the
    exception and the frames in the archive's files either way (worker/main.py).
    """
    if style != TORCHSERVE_ERRORS:
        return failure_response(exc, model_dir)
    if isinstance(exc, ArchiverError):
        if getattr(exc, "error_code", None) is not None:  # ts.utils.util.PredictionException
            return error_response(
                exc.http_status, "InternalServerException", redact_paths(exc.message, model_dir)
            )
        return failure_response(exc, model_dir)
    if isinstance(exc, MemoryError) or "CUDA" in str(exc):
        return error_response(507, "InternalServerException", _OUT_OF_RESOURCES)
    return error_response(503, "InternalServerException", _PREDICTION_FAILED)


def miscounted_response(answers: Any, count: int, style: str) -> InferenceResponse:
    """What each request gets when the handler returned no list, or one of another length: a 500,
    TorchServe's 503 in its style."""
    got = f"{len(answers)} answers" if isinstance(answers, list) else f"a {type(answers).__name__}"
    message = f"handler returned {got} for a batch of {count} requests"
    return error_response(503 if style == TORCHSERVE_ERRORS else 500, "HandlerError", message)


def answer_response(
    context: Any,
    idx: int,
    answer: Any,
    model_dir: Path | str | None,
    tensors: bool = False,
    names: list[str] | None = None,
    keep_tensors: bool = False,
) -> InferenceResponse:
    """The response for request ``idx`` of the batch, from the handler's ``answer`` and what it set
    on ``context`` (status, phrase, headers, content type)."""
    if isinstance(answer, BaseException):
        return failure_response(answer, model_dir)
    try:
        code, phrase = context.get_response_status(idx)
        headers = context.get_response_headers(idx)
        if code >= 400:
            text = phrase if isinstance(phrase, str) and phrase else answer if isinstance(answer, str) else ""
            message = redact_paths(text, model_dir) or f"request failed with {code}"
            return checked(error_response(code, "HandlerError", message))
        if tensors and keep_tensors:
            response: InferenceResponse = OutputsResponse(outputs=_tensor_outputs(answer, names))
            response.headers.update(headers)
            return checked(response)
        if tensors:
            body, content_type, extra = _encode_tensors(answer, names)
            headers = {**headers, **extra}
        else:
            body, content_type = encode_answer(answer, context.get_response_content_type(idx))
        response = InferenceResponse(status=code, body=body, content_type=content_type)
        response.headers.update(headers)
    except ArchiverError as exc:
        return error_response(500, "HandlerError", redact_paths(exc.message, model_dir))
    except Exception as exc:  # noqa: BLE001 - the handler's answer, or what it set, fails its request alone
        return error_response(
            500, "HandlerError", f"the handler's answer cannot be sent: {public_message(exc)}"
        )
    return checked(response)


def tensor_rows(requests: list[InferenceRequest], data: list[dict[str, Any]]) -> set[int]:
    """Replace the rows of v2 requests by their tensors (``handlers.tensors``); their indexes."""
    found: set[int] = set()
    if not any(request.headers.get(PROTOCOL_HEADER) == "v2" for request in requests):
        return found
    from handlers.tensors import handler_row, is_tensor_request

    for i, request in enumerate(requests):
        if is_tensor_request(request.params, request.headers):  # the "v2" marker and its parts
            try:
                data[i] = handler_row(request.params)
            except (ArchiverError, LookupError, TypeError, ValueError):
                continue  # not what our front sends: the handler gets the parts as they are
            found.add(i)
    return found


def output_names(context: Any) -> list[str]:
    from handlers.tensor_answers import signature_output_names

    return signature_output_names(context.model_yaml_config)


def _tensor_outputs(answer: Any, names: list[str] | None) -> list[Any]:
    from handlers.tensor_answers import answer_outputs

    try:
        return answer_outputs(answer, names)
    except ArchiverError:
        raise
    except Exception as exc:  # noqa: BLE001 - an answer that cannot be encoded fails its own request
        raise HandlerError(f"the handler's answer cannot be sent as tensors: {public_message(exc)}") from exc


def _encode_tensors(answer: Any, names: list[str] | None) -> tuple[bytes, str, dict[str, str]]:
    body, length = encode_outputs(_tensor_outputs(answer, names))
    return body, TENSORS_CONTENT_TYPE, {HEADER_LENGTH: str(length)}
