"""Serve archives as a KServe runtime: a ``kserve.Model`` per archive, on KServe's own ModelServer.

    python -m archiver.integrations.kserve --model_dir /mnt/models --http_port 8080

``--model_dir`` is an archive (``.mar``, ``.tar.gz``, folder archive) or a folder of them (KServe's
storage initializer puts the storage URI's files at /mnt/models). KServe answers its v1 and v2 REST
routes, probes and metrics; each model loads with ``load_model`` (the safe reader and the unpack cache)
and runs batches through ``LoadedModel.handle``, the bundled server's code. KServe's v1 dict and v2
``InferRequest`` are mapped to batch elements by ``oip``, as on the bundled server: each v1 instance is
one element (one call's instances form one batch), each v2 request one.

With ``--trusted_key KEY.pub`` (repeatable) every archive's signature (``ARCHIVE.sig`` beside it) is
verified before a byte of it is read; one that does not verify stops the runtime with a one-line reason.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from archiver.errors import ArchiverError, InputFileError, TensorRequestError
from archiver.integrations import log_handler_errors, require_extra, signatures
from archiver.integrations.routes import model_signature
from archiver.serving.protocols import oip
from archiver.serving.protocols.records import InferenceResponse, new_request_id
from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_ITEMS, check_items
from archiver.serving.protocols.wire import RawRequest, to_inference_request

require_extra("kserve")

import kserve  # noqa: E402 - after the one-line message for a missing extra
from kserve.errors import InferenceError, InvalidInput  # noqa: E402
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402

log = logging.getLogger("archiver.integrations.kserve")
ARCHIVE_SUFFIXES = (".mar", ".tar.gz", ".tgz")


class ArchiveModel(kserve.Model):
    """One archive as a KServe model; ``load()`` initializes its handler."""

    def __init__(
        self,
        name: str,
        source: Path,
        cache_dir: str | None = None,
        signer: str | None = None,
        signed_sha256: str | None = None,
    ) -> None:
        super().__init__(name)
        self.source = source
        self.cache_dir = cache_dir
        self.signer = signer  # the verified signer's key fingerprint, with --trusted_key
        self.signed_sha256 = signed_sha256  # the sha256 that verified: load() loads those bytes or none
        self.loaded: Any = None
        self.signature: dict[str, Any] = {"inputs": [], "outputs": []}

    def load(self) -> bool:
        from archiver.serving.worker.loader import load_model

        self.loaded = load_model(
            self.source,
            name=self.name,
            cache_dir=self.cache_dir,
            gpu_id=pod_gpu_id(self.source),
            signed_sha256=self.signed_sha256,
        )
        log_handler_errors(self.loaded, log)
        self.signature = model_signature(str(self.source))
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        """The v2 metadata's inputs, by the bundled server's rules (``oip_metadata``)."""
        return self.signature["inputs"]

    def get_output_types(self) -> list[dict]:
        return self.signature["outputs"]

    async def _handle(self, raws: list[RawRequest]) -> list[InferenceResponse]:
        # Blocking handler code off KServe's event loop; LoadedModel lets one batch run at a time.
        return await asyncio.to_thread(self.loaded.handle, [to_inference_request(r) for r in raws])

    async def predict(
        self,
        payload: dict | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        headers = dict(headers or {})
        try:
            if isinstance(payload, InferRequest):
                return await self._predict_v2(payload, headers)
            return await self._predict_v1(payload, headers)
        except TensorRequestError as exc:
            raise InvalidInput(exc.message) from exc
        except ArchiverError as exc:
            raise InferenceError(exc.message, status=exc.http_status) from exc

    async def _predict_v1(self, payload: Any, headers: dict[str, str]) -> dict:
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
            raise TensorRequestError('a v1 predict body must be a JSON object {"instances": [...]}')
        if not payload["instances"]:
            raise TensorRequestError("'instances' is empty: send at least one instance")
        check_items(len(payload["instances"]), DEFAULT_MAX_REQUEST_ITEMS, "v1 instances")  # 413
        request_id = headers.get("x-request-id") or new_request_id()
        raws = [
            oip.v1_raw_request(instance, f"{request_id}-{i}", headers)
            for i, instance in enumerate(payload["instances"])
        ]
        answers = await self._handle(raws)
        _raise_failed(answers)
        return {"predictions": [oip.v1_prediction(a) for a in answers]}

    async def _predict_v2(self, request: InferRequest, headers: dict[str, str]) -> InferResponse:
        v2 = v2_request(request)
        raw = oip.to_raw_request(v2, request.id or new_request_id(), headers)
        answers = await self._handle([raw])
        _raise_failed(answers)
        outputs = [
            InferOutput(name=o.name, shape=o.shape, datatype=o.datatype, data=_output_values(o))
            for o, _ in oip.select_outputs(v2, oip.answer_outputs(answers[0]))
        ]
        return InferResponse(
            response_id=request.id or "",
            model_name=self.name,
            model_version=self.loaded.version,
            infer_outputs=outputs,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )


def pod_gpu_id(source: Path) -> int | None:
    """The GPU of this pod for the model at ``source``: its ``nvidia.com/gpu`` is all its CUDA sees,
    so the first, 0, when CUDA is there; none for ``deviceType: cpu`` (``placement.replica_gpu_id``)."""
    import torch

    from archiver.integrations.archive_plan import plan_archive
    from archiver.serving.supervisor.placement import replica_gpu_id

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return replica_gpu_id(plan_archive(source).device_type, visible, "this KServe pod")


def v2_request(request: InferRequest) -> oip.V2Request:
    """KServe's decoded ``InferRequest`` as the bundled server's ``V2Request`` (validated there)."""
    inputs = []
    for tensor in request.inputs:
        raw = getattr(tensor, "_raw_data", None)  # the binary extension's bytes, when it came that way
        params = {k: v for k, v in dict(tensor.parameters or {}).items() if k != "binary_data_size"}
        data = raw if raw is not None else tensor.data
        if data is None:
            raise TensorRequestError(f"input {tensor.name!r} has no data")
        inputs.append(oip.make_input(tensor.name, tensor.datatype, list(tensor.shape), data, params))
    outputs = None
    if request.request_outputs:
        outputs = [
            oip.RequestedOutput(o.name, o.binary_data, dict(o.parameters or {}))
            for o in request.request_outputs
        ]
    return oip.make_request(inputs, id=request.id, outputs=outputs, parameters=dict(request.parameters or {}))


def _output_values(output: oip.OutputTensor) -> list[Any]:
    values = output.values()
    if output.datatype == "BYTES":
        # KServe writes JSON outputs with a JSON encoder: text stays text; other bytes go as they are.
        try:
            return [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            return values
    return values


def _raise_failed(answers: list[InferenceResponse]) -> None:
    for answer in answers:
        if answer.ok:
            continue
        message = answer.message or f"request failed with {answer.status}"
        if answer.status == 400:
            raise InvalidInput(message)
        raise InferenceError(message, status=answer.status)


# ---- the runtime's command line ------------------------------------------------------------------
def find_archives(model_dir: Path) -> list[Path]:
    """``model_dir`` itself when it is an archive, else every archive directly inside it (sorted)."""
    if not model_dir.exists():
        raise InputFileError(f"{model_dir}: no such file or folder")
    if model_dir.is_file() or (model_dir / "MAR-INF" / "MANIFEST.json").is_file():
        return [model_dir]
    found = [
        p
        for p in sorted(model_dir.iterdir())
        if (p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES)) or (p / "MAR-INF" / "MANIFEST.json").is_file()
    ]
    if not found:
        raise InputFileError(f"{model_dir} holds no archive (.mar, .tar.gz or a folder with MAR-INF/)")
    return found


def build_models(
    model_dir: Path,
    model_name: str | None = None,
    cache_dir: str | None = None,
    trusted_keys: tuple[Any, ...] = (),
) -> list[ArchiveModel]:
    """One model per archive, named by its manifest; ``model_name`` renames a lone archive's model
    (KServe passes the InferenceService's name, the name its URLs use). With ``trusted_keys`` each
    archive's signature is verified first (SignatureError when it does not). A stateful archive is
    refused (ConfigError: ``archive_plan.refuse_stateful``)."""
    from archiver.integrations.archive_plan import read_config, refuse_stateful
    from archiver.reader import open_archive

    sources = find_archives(model_dir)
    models = []
    for source in sources:
        check = signatures.check_archive(source, trusted_keys)
        signer = check.fingerprint if check is not None else None
        if signer is not None:
            log.info("%s: signature verified, signed by key %s", source.name, signer)
        with open_archive(source) as reader:
            name = reader.manifest.model_name
            refuse_stateful(read_config(reader, reader.manifest.config_file), name)
        if model_name and len(sources) == 1:
            name = model_name
        models.append(ArchiveModel(name, source, cache_dir, signer, signatures.signed_sha256(check)))
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m archiver.integrations.kserve",
        description="Serve .mar archives on KServe's ModelServer.",
        parents=[kserve.model_server.parser],
    )
    parser.add_argument("--model_dir", required=True, help="An archive, or a folder of archives.")
    parser.add_argument(
        "--cache_dir", default=None, help="The unpack cache (default: $MODEL_ARCHIVER_CACHE)."
    )
    parser.add_argument(
        "--trusted_key",
        action="append",
        default=[],
        help="Serve only archives signed by this EC public key (ARCHIVE.sig beside each); repeatable.",
    )
    args, _ = parser.parse_known_args(argv)
    if args.workers != 1:
        # The handlers are loaded in this one process; KServe's multi-process mode is not supported here.
        print(
            "model-archiver kserve: error: --workers must be 1 (one handler per pod; scale with the "
            "InferenceService's replicas)",
            file=sys.stderr,
        )
        return 2
    try:
        # KServe's default --model_name is "model"; only a name someone chose renames an archive's model.
        chosen = args.model_name if args.model_name != "model" else None
        keys = signatures.trusted_keys(args.trusted_key)
        models = build_models(Path(args.model_dir), chosen, args.cache_dir, keys)
        for model in models:
            model.load()
    except ArchiverError as exc:
        print(f"model-archiver kserve: error: {' '.join(exc.message.split())}", file=sys.stderr)
        return 1
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1).start(models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
