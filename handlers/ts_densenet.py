"""TorchServe's ``ts.torch_handler.densenet_handler.DenseNetHandler``: serialized tensors in, logits out.

Each request's body is a tensor saved with ``torch.save``; the batch is stacked and run through the
model, and each request gets its row of the output, shaped ``[1, classes]`` as TorchServe's answer to
a batch of one. Unlike TorchServe's, the body is read with ``weights_only=True`` (a client's bytes
never unpickle objects), and a body that is not a tensor fails its own request with a 400.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from archiver.errors import HandlerInputError
from handlers._ts_compat import list_classes_from_module
from handlers.base import BaseHandler, payload_of

__all__ = ["DenseNetHandler", "list_classes_from_module"]


class DenseNetHandler(BaseHandler):
    """The model from the manifest (TorchScript, or eager with its model file); tensors in, rows out."""

    def preprocess(self, data: list[Any]) -> torch.Tensor | None:
        tensors = []
        for index, row in enumerate(data):
            payload = payload_of(row)
            try:
                if not isinstance(payload, (bytes, bytearray)):
                    raise HandlerInputError("expected a tensor saved with torch.save as the body")
                tensor = torch.load(io.BytesIO(payload), weights_only=True)
                if not isinstance(tensor, torch.Tensor):
                    raise HandlerInputError(f"expected a saved tensor, got a {type(tensor).__name__}")
            except HandlerInputError as exc:
                self.reject(index, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - any unreadable body is the client's 400
                self.reject(index, HandlerInputError(f"not a tensor saved with torch.save: {exc}"))
                continue
            tensors.append(tensor)
        if not tensors:
            return None
        try:
            return torch.stack(tensors).to(self.device)
        except RuntimeError as exc:
            raise HandlerInputError(f"the batch's tensors differ in shape: {exc}") from exc

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.model(data.to(self.device), *args, **kwargs)

    def postprocess(self, data: torch.Tensor) -> list[Any]:
        return [data[i : i + 1].tolist() for i in range(data.shape[0])]
