"""BaseHandler: load the archive's model, then answer batches by preprocess → inference → postprocess.

The protocol is TorchServe's, so its handlers carry over: ``initialize(context)`` once, then
``handle(data, context)`` per batch, ``data`` being one dict per request with the payload under ``"data"``
or ``"body"``. Two additions: a handler's ``preprocess`` may call ``self.reject(index, error)`` for a
request it cannot use, and ``handle`` then answers the others and puts the error at that index; and
``self.mapping`` is ``index_to_name.json`` as written (see ``handlers.labels``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from archiver.errors import ArchiverError, HandlerError, HandlerInputError
from handlers.aot_library import AotLibraryModel
from handlers.context import Context
from handlers.explain import check_explainable, explain_requested, request_target
from handlers.input_dtypes import input_dtypes, is_input_fault, json_tensor
from handlers.labels import LABEL_FILE, load_label_mapping
from handlers.model_loading import (
    AotiModel,
    build_eager_model,
    compile_if_configured,
    load_serialized_model,
    load_state_dict_into,
    select_device,
)
from handlers.tensor_batch import join_tensor_rows, split_tensor_rows, tensor_groups
from handlers.tensors import TensorRow


def payload_of(row: Any) -> Any:
    """A request's payload, TorchServe's way: the form field ``data``, else the whole ``body``."""
    if not isinstance(row, dict):
        return row
    value = row.get("data")
    return row.get("body") if value is None else value


class BaseHandler:
    """Load the model named by the manifest; answer a batch as postprocess(inference(preprocess(data)))."""

    # TorchServe's names, set by initialize: the device's type ("cuda", "cpu") and the serialized file.
    map_location: str | None = None
    model_pt_path: str | None = None

    def __init__(self) -> None:
        self.model: Any = None
        self.mapping: dict[str, Any] | None = None
        self.device: torch.device | None = None
        self.initialized = False
        self.context: Context | None = None
        self.manifest: dict[str, Any] | None = None
        self.model_dir: Path | None = None
        self._rejected: dict[int, ArchiverError] = {}
        # Rows each v2 request brought to the current batch (None: not a batch of tensor requests).
        self._tensor_counts: list[int] | None = None
        self._input_dtypes: list[torch.dtype | None] | None = None  # learned at the first batch
        self.explain = False  # TorchServe's flag, set by _is_explain

    def initialize(self, context: Context) -> None:
        """Find the serialized file from the manifest, load it on the right device, read the labels."""
        self.context = context
        properties = context.system_properties
        self.model_dir = Path(properties["model_dir"])
        self.manifest = context.manifest or {}
        config = context.model_yaml_config or {}
        self.device = select_device(properties.get("gpu_id"), config.get("deviceType"))
        model_info = self.manifest.get("model", {})
        model = load_serialized_model(
            self.model_dir,
            model_info.get("serializedFile"),
            model_info.get("modelFile"),
            self.device,
            config,
        )
        if isinstance(model, AotLibraryModel):
            self.device = model.device  # where its compiled code runs
        if isinstance(model, AotiModel):
            self.device = model.device  # where its compiled code runs, whatever the worker was given
            model.warn_past(properties.get("batch_size"))
        self.map_location = self.device.type if self.device is not None else "cpu"
        serialized = model_info.get("serializedFile")
        self.model_pt_path = str(self.model_dir / serialized) if serialized else None
        self.model = compile_if_configured(model, context.model_yaml_config)
        self.mapping = load_label_mapping(self.model_dir / LABEL_FILE)
        self.initialized = True

    # TorchServe's BaseHandler helpers, which custom initialize methods call.
    def _load_torchscript_model(self, model_pt_path: str | Path) -> Any:
        """TorchServe's helper: a TorchScript file, on this handler's device."""
        return torch.jit.load(str(model_pt_path), map_location=self.device)

    def _load_torch_export_aot_compile(self, model_so_path: str | Path) -> Any:
        """TorchServe's helper: a ``torch._export.aot_compile`` library, on this handler's device."""
        return AotLibraryModel.load(Path(model_so_path), self.device or torch.device("cpu"))

    def _load_pickled_model(self, model_dir: str | Path, model_file: str, model_pt_path: str | Path) -> Any:
        """TorchServe's helper: the one nn.Module class in ``model_file``, weights from ``model_pt_path``."""
        model = build_eager_model(Path(model_dir), Path(model_file).name)
        if model_pt_path and Path(model_pt_path).is_file():
            load_state_dict_into(model, Path(model_pt_path), self.device)
        return model.to(self.device)

    def get_device(self) -> torch.device | None:
        """TorchServe's accessor: the device the model runs on."""
        return self.device

    def _is_describe(self) -> bool:
        """TorchServe's test: the batch's first request asks for the handler's own description."""
        try:
            return self.context is not None and self.context.get_request_header(0, "describe") == "True"
        except IndexError:  # outside a batch
            return False

    def describe_handle(self) -> Any:
        """TorchServe's hook for a customized description; a subclass returns what to describe."""
        return None

    def handler_config(self) -> dict[str, Any]:
        """The ``handler:`` section of the model's model-config.yaml (empty when absent)."""
        config = (self.context.model_yaml_config if self.context else None) or {}
        section = config.get("handler")
        return section if isinstance(section, dict) else {}

    def reject(self, index: int, error: BaseException | str) -> None:
        """Fail request ``index`` alone (400 unless ``error`` says otherwise); call from preprocess."""
        if not isinstance(error, ArchiverError):
            error = HandlerInputError(str(error))
        self._rejected[index] = error

    def input_dtypes(self) -> list[torch.dtype | None]:
        """The dtype each of the model's inputs expects, where known (``handlers.input_dtypes``)."""
        known = getattr(self, "_input_dtypes", None)
        if known is None:
            config = self.context.model_yaml_config if self.context is not None else None
            known = self._input_dtypes = input_dtypes(self.model, config)
        return known

    def preprocess(self, data: list[dict[str, Any]]) -> Any:
        """Each request's payload (JSON numbers) as one row of a tensor, in the model's input dtype
        (whole numbers to a float model become floats); the tensors of Open Inference Protocol requests
        joined on their first dimension (a [2, 4] input is two rows of the batch). A request whose
        numbers do not fit, or whose shape differs from the batch's first, is rejected alone (400)."""
        dtypes = self.input_dtypes()
        if data and all(isinstance(row, TensorRow) for row in data):
            joined, self._tensor_counts, refused = join_tensor_rows(data, self.device, dtypes)
            for index, reason in refused.items():
                self.reject(index, reason)
            return joined
        dtype = dtypes[0] if len(dtypes) == 1 else None  # one tensor: for a model of one input
        rows: list[torch.Tensor] = []
        for index, row in enumerate(data):
            try:
                tensor = json_tensor(payload_of(row), dtype, "the request's data")
            except ArchiverError as exc:
                self.reject(index, exc)
                continue
            if rows and (tensor.shape != rows[0].shape or tensor.dtype != rows[0].dtype):
                self.reject(index, HandlerInputError(_unlike(tensor, rows[0])))
                continue
            rows.append(tensor)
        if not rows:
            return None
        return torch.stack(rows).to(self.device) if self.device is not None else torch.stack(rows)

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            if isinstance(data, torch.Tensor):
                data = data.to(self.device)
            return self.model(data, *args, **kwargs)

    def postprocess(self, data: Any) -> list[Any]:
        """One answer per request: a row of the output as a list; for Open Inference Protocol requests
        their rows of the output tensor(s), sent back with their shape and datatype."""
        if self._tensor_counts is not None:
            return split_tensor_rows(data, self._tensor_counts)
        return data.tolist()

    def handle(self, data: list[dict[str, Any]], context: Context) -> list[Any]:
        """One batch: preprocess → inference → postprocess; rejected requests get their error back.

        Open Inference Protocol requests whose tensors cannot be joined (another dtype, or other
        dimensions after the first) go through the model in groups of their own.
        """
        started = time.perf_counter()
        self.context = context
        asked = [explain_requested(context, i) for i in range(len(data))]
        groups = tensor_groups(data)
        if any(asked):
            answers = self._explain_or_answer(data, asked)
        elif len(groups) == 1:
            answers = self._answer(data)
        else:
            answers = [None] * len(data)
            for group in groups:
                for index, answer in zip(group, self._answer([data[i] for i in group]), strict=True):
                    answers[index] = answer
        if context is not None and context.metrics is not None:
            context.metrics.add_time("HandlerTime", (time.perf_counter() - started) * 1000, None, "ms")
        return answers

    # ---- explanations (TorchServe's explain_handle / get_insights; handlers/explain.py) ------------
    def _is_explain(self) -> bool:
        """TorchServe's test, for handlers that call it: the batch's first request asks to be explained."""
        self.explain = explain_requested(self.context, 0)
        return self.explain

    def explain_handle(self, data_preprocess: Any, raw_data: list[Any]) -> Any:
        """TorchServe's: ``get_insights`` on the preprocessed batch, for the first request's ``target``."""
        check_explainable(self, self._model_name())
        inputs = payload_of(raw_data[0]) if raw_data else None
        return self.get_insights(data_preprocess, inputs, request_target(raw_data))  # type: ignore[attr-defined]

    def _explain_or_answer(self, data: list[dict[str, Any]], asked: list[bool]) -> list[Any]:
        """Explain the requests that asked and predict the others; when this handler cannot explain,
        each request that asked gets the 501 and the others their predictions."""
        try:
            check_explainable(self, self._model_name())
            cannot: ArchiverError | None = None
        except ArchiverError as exc:
            cannot = exc
        answers: list[Any] = [cannot] * len(data)
        for explain in (False, True):
            group = [i for i, flag in enumerate(asked) if flag is explain]
            if group and not (explain and cannot):
                got = self._answer([data[i] for i in group], explain=explain)
                for index, answer in zip(group, got, strict=True):
                    answers[index] = answer
        return answers

    def _model_name(self) -> str:
        return str((self.manifest or {}).get("model", {}).get("modelName") or type(self).__name__)

    def _answer(self, data: list[dict[str, Any]], explain: bool = False) -> list[Any]:
        """preprocess → inference → postprocess for one batch (or group), with rejected requests' errors;
        with ``explain``, preprocess → explain_handle."""
        self._rejected = {}
        self._tensor_counts = None
        model_input = self.preprocess(data)
        kept = [i for i in range(len(data)) if i not in self._rejected]
        answers: list[Any] = []
        if kept and explain:
            answers = self.explain_handle(model_input, [data[i] for i in kept])
        elif kept:
            try:
                if isinstance(model_input, tuple) and self._tensor_counts is not None:
                    output = self.inference(*model_input)  # several inputs, in the request's order
                else:
                    output = self.inference(model_input)
            except Exception as exc:
                error = self._model_call_error(exc)
                if error is exc:
                    raise
                raise error from exc
            answers = self.postprocess(output)
        if self._rejected:
            if not isinstance(answers, list) or len(answers) != len(kept):
                raise HandlerError(
                    f"{type(self).__name__} answered {_count(answers)} of the {len(kept)} requests it kept"
                )
            merged: list[Any] = list(self._rejected.get(i) for i in range(len(data)))
            for index, answer in zip(kept, answers, strict=True):
                merged[index] = answer
            answers = merged
        return answers

    def _model_call_error(self, exc: Exception) -> Exception:
        """A model call that failed on the request's own tensors (the default preprocess made them
        from its numbers as they came) is the client's 400, in one line; anything else stays as it is."""
        if type(self).preprocess is not BaseHandler.preprocess or not is_input_fault(exc):
            return exc
        from archiver.serving.protocols.redaction import public_message

        dtypes = [str(d).removeprefix("torch.") for d in self.input_dtypes() if d is not None]
        takes = f" (it takes {', '.join(dtypes)})" if dtypes else ""
        return HandlerInputError(f"the model cannot take this input{takes}: {public_message(exc)}")


def _unlike(tensor: torch.Tensor, first: torch.Tensor) -> str:
    return (
        f"the request's data has shape {list(tensor.shape)} ({str(tensor.dtype).removeprefix('torch.')}), "
        f"unlike the batch's {list(first.shape)} ({str(first.dtype).removeprefix('torch.')}): "
        "send it alone, or shaped like the others"
    )


def _count(answers: Any) -> str:
    return str(len(answers)) if isinstance(answers, list) else f"a {type(answers).__name__} instead"
