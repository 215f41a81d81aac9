"""The worker's side of a v2 request sent whole (``oip.body_raw_request``): parse it, run it through
the handler with the rest of the batch, answer the finished v2 response.

Parsing here rather than in the front keeps the front's event loop to moving bytes, as for
``/predictions``: the JSON header, the checks, the tensors and the response's JSON are the worker's
CPU time, paid in parallel by as many workers as the model has. A request that does not parse gets
its own 400 and never reaches the handler; the others are answered as usual.
"""

from __future__ import annotations

from collections.abc import Callable

from archiver.errors import ArchiverError
from archiver.serving.protocols import oip
from archiver.serving.protocols.records import InferenceRequest, InferenceResponse, error_response
from archiver.serving.protocols.redaction import public_message

HandleBatch = Callable[[list[InferenceRequest]], list[InferenceResponse]]


def _parse(request: InferenceRequest) -> oip.V2Request:
    body = request.params.get(oip.BODY_PART)
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray)):
        raise oip.TensorRequestError("the v2 request has no body")
    # a bytearray as it is: parsing copies each tensor's bytes out of it, so a whole copy is waste
    headers = request.headers
    return oip.parse_infer_request(body, headers.get(oip.BODY_HEADER_LENGTH), oip.max_inputs_of(headers))


def _error(exc: ArchiverError) -> InferenceResponse:
    return error_response(exc.http_status, type(exc).__name__, exc.message)


def answer_v2_bodies(
    requests: list[InferenceRequest], handle: HandleBatch, model_name: str, model_version: str | None
) -> list[InferenceResponse]:
    """One response per request, in order: v2 bodies parsed, the batch (less what did not parse) run
    through ``handle``, and each v2 answer built into its finished response."""
    answers: list[InferenceResponse | None] = [None] * len(requests)
    parsed: list[oip.V2Request | None] = [None] * len(requests)
    refused = False
    for index, request in enumerate(requests):
        headers = request.headers
        if headers.get(oip.PROTOCOL_HEADER) != oip.V2_BODY:
            continue
        try:
            v2 = _parse(request)
        except ArchiverError as exc:
            answers[index] = _error(exc)
            refused = True
            continue
        except Exception as exc:  # noqa: BLE001 - bytes the parser did not foresee fail their request alone
            answers[index] = error_response(
                400, "TensorRequestError", f"the v2 request cannot be read: {public_message(exc)}"
            )
            refused = True
            continue
        parsed[index] = v2
        headers.pop(oip.BODY_HEADER_LENGTH, None)
        headers[oip.PROTOCOL_HEADER] = "v2"
        # the parsed request itself, in place of the body (this request is the worker's own):
        # handlers.tensors makes the handler's row from it directly
        request.params.clear()
        request.params[oip.REQUEST_PART] = v2
        request.param_content_types.clear()
    if not refused:  # the usual batch: every request runs
        answers = [answer for _, answer in zip(requests, handle(requests), strict=True)]
    else:
        run = [index for index, answer in enumerate(answers) if answer is None]
        if run:
            for index, answer in zip(run, handle([requests[i] for i in run]), strict=True):
                answers[index] = answer
    for index, v2 in enumerate(parsed):
        if v2 is None:
            continue
        answer = answers[index]
        if answer is None or not answer.ok:
            continue
        try:
            body, content_type, header_length = oip.build_infer_response(
                v2, answer, model_name, model_version
            )
        except ArchiverError as exc:
            answers[index] = _error(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - the handler's outputs fail their own request alone
            answers[index] = error_response(
                500, "HandlerError", f"the handler's outputs cannot be sent: {public_message(exc)}"
            )
            continue
        headers = answer.headers
        if oip.HEADER_LENGTH in headers:
            headers = {k: v for k, v in headers.items() if k != oip.HEADER_LENGTH}
        if header_length is not None:
            headers[oip.HEADER_LENGTH] = str(header_length)
        answers[index] = InferenceResponse(status=200, body=body, content_type=content_type, headers=headers)
    return [a if a is not None else error_response(500, "HandlerError", "no answer") for a in answers]
