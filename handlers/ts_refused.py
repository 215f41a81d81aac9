"""The ``ts.*`` modules a handler cannot import here, each with the reason its import fails with.

TorchServe's own backend (its worker loop, model loader, wire protocol, launchers) has our worker in
its place; the engines below need software and multi-process launchers this server does not run. A
handler importing one fails to load with ``ts.X is not provided: <why>``, in one line.
"""

from __future__ import annotations

_BACKEND = "TorchServe's own backend; this server loads and runs handlers with its worker (archiver.serving)"
_DALI = "NVIDIA DALI preprocessing pipelines are not supported here; decode in the handler (VisionHandler)"
_DISTRIBUTED = (
    "multi-process model parallelism (torchrun, parallelType) is not run here; serve one process per model"
)
_METRICS_BACKEND = (
    "TorchServe's metrics backend; a handler reports through context.metrics (add_metric, get_metric...)"
)

REFUSED: dict[str, str] = {
    "ts.arg_parser": _BACKEND,
    "ts.async_service": _BACKEND,
    "ts.model_loader": _BACKEND,
    "ts.model_server": _BACKEND,
    "ts.model_service": _BACKEND,
    "ts.model_service.model_service": _BACKEND + " (MMS-style ModelService classes are not run)",
    "ts.model_service_worker": _BACKEND,
    "ts.service": _BACKEND,
    "ts.launcher": "starts TorchServe's own processes; use model-archiver serve",
    "ts.llm_launcher": "starts TorchServe with a vLLM/TensorRT-LLM engine, which is not run here",
    "ts.utils.setup_model_venv": "per-model venvs are made by serve (useVenv, --install-model-deps)",
    "ts.utils.hf_utils": "downloads Hugging Face models for ts.llm_launcher; put the weights in the archive",
    "ts.handler_utils.preprocess": _DALI,
    "ts.handler_utils.preprocess.dali": _DALI,
    "ts.torch_handler.dali_handler": _DALI,
    "ts.torch_handler.dali_image_classifier": _DALI,
    "ts.handler_utils.distributed": _DISTRIBUTED,
    "ts.handler_utils.distributed.deepspeed": _DISTRIBUTED + " (DeepSpeed)",
    "ts.handler_utils.distributed.pt_pippy": _DISTRIBUTED + " (PiPPy)",
    "ts.torch_handler.distributed": _DISTRIBUTED,
    "ts.torch_handler.distributed.base_deepspeed_handler": _DISTRIBUTED + " (DeepSpeed)",
    "ts.torch_handler.distributed.base_pippy_handler": _DISTRIBUTED + " (PiPPy)",
    "ts.torch_handler.trt_llm_handler": "TensorRT-LLM engines are not run here",
    "ts.torch_handler.vllm_handler": "vLLM's async engine is not run here; serve vLLM on its own",
    "ts.torch_handler.unit_tests": "TorchServe's own tests; build a handlers.Context for yours",
    "ts.metrics.system_metrics": "host metrics are the server's own (/metrics), not a handler's",
    "ts.metrics.process_memory_metric": "worker memory is the server's own metric (/metrics, describe)",
    "ts.metrics.metric_collector": _METRICS_BACKEND,
    "ts.metrics.metric": _METRICS_BACKEND,
    "ts.metrics.metric_abstract": _METRICS_BACKEND,
    "ts.metrics.metric_cache_abstract": _METRICS_BACKEND,
    "ts.metrics.metric_cache_yaml_impl": _METRICS_BACKEND,
    "ts.metrics.metric_encoder": _METRICS_BACKEND,
    "ts.metrics.metrics_store": _METRICS_BACKEND,
    "ts.metrics.unit": _METRICS_BACKEND,
}


def refusal(name: str) -> str | None:
    """Why ``name`` (or the refused package it lies in) is not provided; None when it is not refused."""
    probe = name
    while probe:
        if probe in REFUSED:
            return f"{name} is not provided: {REFUSED[probe]}"
        probe = probe.rpartition(".")[0]
    return None
