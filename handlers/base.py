"""BaseHandler: load the archive's model, then answer batches by preprocess → inference → postprocess.

The protocol is TorchServe's, so its handlers carry over: ``initialize(context)`` once, then
``handle(data, context)`` per batch, ``data`` being one dict per request with the payload under ``"data"``
or ``"body"``. Two additions: a handler's ``preprocess`` may call ``self.reject(index, error)`` for a
request it cannot use, and ``handle`` then answers the others and puts the error at that index; and
``self.mapping`` is ``index_to_name.json`` as written (see ``handlers.labels``).
"""

from __future__ import annotations

import inspect
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from archiver.errors import ArchiverError, HandlerError, HandlerInputError
from handlers.context import Context
from handlers.labels import LABEL_FILE, load_label_mapping

# TorchServe archives are TorchScript; loading them is the point, so torch's deprecation notice is noise.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)


def select_device(gpu_id: int | None) -> torch.device:
    """CUDA device ``gpu_id`` when one is asked for and present, else the CPU."""
    if gpu_id is not None and gpu_id >= 0 and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def load_serialized_model(
    model_dir: Path, serialized_file: str | None, model_file: str | None, device: torch.device
) -> Any:
    """Load the archive's model: eager (model file + state dict), torch.export (.pt2) or TorchScript."""
    path = model_dir / serialized_file if serialized_file else None
    if path is not None and not path.is_file():
        raise HandlerError(f"serialized file {serialized_file} is not in the archive")
    if model_file:
        model = _build_eager_model(model_dir, model_file)
        if path is not None:
            try:
                state = torch.load(path, map_location=device, weights_only=True)
            except Exception as exc:
                raise HandlerError(
                    f"cannot load the state dict {serialized_file} (weights_only=True): {_reason(exc)}"
                ) from exc
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            try:
                model.load_state_dict(state)
            except Exception as exc:
                raise HandlerError(
                    f"{serialized_file} does not fit the model in {model_file}: {exc}"
                ) from exc
        return model.to(device).eval()
    if path is None:
        raise HandlerError(
            "the manifest names neither a serializedFile nor a modelFile, so there is no model"
        )
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise HandlerError(f"cannot load the torch.export program {path.name}: {_reason(exc)}") from exc
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return program.module()
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise HandlerError(
            f"cannot load {path.name} as TorchScript: {_reason(exc)} (an eager state dict needs "
            "--model-file with the model class)"
        ) from exc
    return model.eval()


def _build_eager_model(model_dir: Path, model_file: str) -> torch.nn.Module:
    """Import the model file (isolated) and instantiate the one nn.Module subclass it defines."""
    from archiver.serving.isolation import import_file_module

    try:
        module = import_file_module(model_dir, model_file)
    except (Exception, SystemExit) as exc:
        raise HandlerError(f"cannot import the model file {model_file}: {_reason(exc)}") from exc
    classes = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and obj.__module__ == module.__name__ and issubclass(obj, torch.nn.Module)
    ]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise HandlerError(f"{model_file} must define exactly one nn.Module subclass, found {found}")
    try:
        return classes[0]()
    except Exception as exc:
        raise HandlerError(
            f"cannot create {classes[0].__name__}() from {model_file}: {_reason(exc)}"
        ) from exc


def payload_of(row: Any) -> Any:
    """A request's payload, TorchServe's way: the form field ``data``, else the whole ``body``."""
    if not isinstance(row, dict):
        return row
    value = row.get("data")
    return row.get("body") if value is None else value


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class BaseHandler:
    """Load the model named by the manifest; answer a batch as postprocess(inference(preprocess(data)))."""

    def __init__(self) -> None:
        self.model: Any = None
        self.mapping: dict[str, Any] | None = None
        self.device: torch.device | None = None
        self.initialized = False
        self.context: Context | None = None
        self.manifest: dict[str, Any] | None = None
        self.model_dir: Path | None = None
        self._rejected: dict[int, ArchiverError] = {}

    def initialize(self, context: Context) -> None:
        """Find the serialized file from the manifest, load it on the right device, read the labels."""
        self.context = context
        properties = context.system_properties
        self.model_dir = Path(properties["model_dir"])
        self.manifest = context.manifest or {}
        self.device = select_device(properties.get("gpu_id"))
        model_info = self.manifest.get("model", {})
        self.model = load_serialized_model(
            self.model_dir, model_info.get("serializedFile"), model_info.get("modelFile"), self.device
        )
        self.mapping = load_label_mapping(self.model_dir / LABEL_FILE)
        self.initialized = True

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

    def preprocess(self, data: list[dict[str, Any]]) -> Any:
        """Each request's payload (JSON numbers) as one row of a tensor."""
        return torch.as_tensor([payload_of(row) for row in data], device=self.device)

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            if isinstance(data, torch.Tensor):
                data = data.to(self.device)
            return self.model(data, *args, **kwargs)

    def postprocess(self, data: Any) -> list[Any]:
        return data.tolist()

    def handle(self, data: list[dict[str, Any]], context: Context) -> list[Any]:
        """One batch: preprocess → inference → postprocess; rejected requests get their error back."""
        started = time.perf_counter()
        self.context = context
        self._rejected = {}
        model_input = self.preprocess(data)
        kept = [i for i in range(len(data)) if i not in self._rejected]
        answers: list[Any] = []
        if kept:
            answers = self.postprocess(self.inference(model_input))
        if self._rejected:
            if not isinstance(answers, list) or len(answers) != len(kept):
                raise HandlerError(
                    f"{type(self).__name__} answered {_count(answers)} of the {len(kept)} requests it kept"
                )
            merged: list[Any] = list(self._rejected.get(i) for i in range(len(data)))
            for index, answer in zip(kept, answers, strict=True):
                merged[index] = answer
            answers = merged
        if context is not None and context.metrics is not None:
            context.metrics.add_time("HandlerTime", (time.perf_counter() - started) * 1000, None, "ms")
        return answers


def _count(answers: Any) -> str:
    return str(len(answers)) if isinstance(answers, list) else f"a {type(answers).__name__} instead"
