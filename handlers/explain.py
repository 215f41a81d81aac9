"""Explanations as TorchServe answers them: ``/explanations`` (the ``explain: True`` header) runs the
handler's ``get_insights`` on its preprocessed batch, Captum's attributions for the vision handlers.

TorchServe explains a whole batch when its first request asks; here each request is answered as it
asked (predictions and explanations batched together are split, see ``BaseHandler.handle``). A handler
without ``get_insights``, or one that needs Captum where it is not installed, is a 501 with the
reason, where TorchServe fails with an AttributeError's 500. Captum is imported only when an
explanation is asked for: it is the ``examples`` extra, not a dependency of serving.
"""

from __future__ import annotations

from typing import Any

import torch

from archiver.errors import ExplanationUnsupportedError, HandlerInputError

EXPLAIN_HEADER = "explain"
IG_STEPS = 15  # TorchServe's VisionHandler.get_insights


def explain_requested(context: Any, index: int) -> bool:
    """Whether request ``index`` of the batch asked for an explanation (TorchServe's header, "True")."""
    if context is None:
        return False
    try:
        return context.get_request_header(index, EXPLAIN_HEADER) == "True"
    except IndexError:  # a context without this batch's requests (a handler driven by hand)
        return False


def check_explainable(handler: Any, model_name: str) -> None:
    """ExplanationUnsupportedError (501) unless ``handler`` has TorchServe's ``get_insights`` hook."""
    if not callable(getattr(handler, "get_insights", None)):
        raise ExplanationUnsupportedError(
            f"model {model_name} cannot explain: its handler {type(handler).__name__} has no get_insights "
            "(TorchServe's explanation hook; the vision handlers have one, using Captum)"
        )


def request_target(raw_data: list[Any]) -> Any:
    """The class to explain: the first request's ``target`` field when it is a dict, else 0 (TorchServe)."""
    row = raw_data[0] if raw_data else None
    target = row.get("target") if isinstance(row, dict) else None
    if isinstance(target, (bytes, bytearray)):  # a form field arrives as bytes
        try:
            target = int(target)
        except ValueError as exc:
            raise HandlerInputError("the target field must be a class index (an integer)") from exc
    return target or 0


def integrated_gradients(model: Any, inputs: torch.Tensor, target: Any, n_steps: int = IG_STEPS) -> list:
    """Captum's IntegratedGradients attributions of ``inputs`` for class ``target``, one per row."""
    try:
        from captum.attr import IntegratedGradients
    except ImportError as exc:
        raise ExplanationUnsupportedError(
            "explanations need Captum, which is not installed here: pip install captum "
            "(or torchmar[examples])"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise ExplanationUnsupportedError(
            f"explanations need gradients, and this model is compiled code ({type(model).__name__}): "
            "serve its eager or TorchScript form to explain it"
        )
    with torch.enable_grad():
        return IntegratedGradients(model).attribute(inputs, target=target, n_steps=n_steps).tolist()
