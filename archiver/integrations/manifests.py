"""The files ``model-archiver deploy`` writes: a Ray Serve config, KServe's YAML and a runtime Dockerfile.

Each is built from the archives' own settings (``archive_plan``) and checked by the engine's own
schema before it is written: Ray's ``ServeDeploySchema``, the kserve SDK's model classes. Nothing here
talks to a cluster.
"""

from __future__ import annotations

import re
from typing import Any

from archiver import __version__
from archiver.errors import ConfigError, UsageError
from archiver.integrations import require_extra
from archiver.integrations.archive_plan import ServePlan, is_remote, local_path

RAY_IMPORT_PATH = "archiver.integrations.ray_serve:build_app"
KSERVE_RUNTIME = "model-archiver"
# The model formats the runtime declares: its own, and the one KServe's TorchServe runtime served.
KSERVE_FORMATS = (("mar", True), ("pytorch", False))
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the storage URI's files
KSERVE_HTTP_PORT = 8080
KSERVE_KEYS_DIR = "/etc/model-archiver/trusted-keys"  # the trusted-keys ConfigMap, mounted read-only
KSERVE_KEYS_CONFIG_MAP = "model-archiver-trusted-keys"
GPU_RESOURCE = "nvidia.com/gpu"  # the NVIDIA device plugin's resource name
DEFAULT_IMAGE = f"torchmar-kserve:{__version__}"
# What the runtime container runs: the command the tests run against KServe's ModelServer.
KSERVE_ENTRYPOINT = ["python", "-m", "archiver.integrations.kserve"]


# ---- Ray Serve --------------------------------------------------------------------------------------
def ray_serve_config(
    sources: list[str],
    plans: list[ServePlan],
    deployment_names: list[str],
    *,
    app_name: str = "archives",
    host: str = "127.0.0.1",
    port: int = 8000,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Ray Serve config (``serve run``/``serve deploy``/KubeRay's ``serveConfigV2``) for ``sources``.

    ``args`` name the archives (absolute paths, or the URIs as given) and the overrides; the
    ``deployments`` section spells out each model's replicas, batching room and resources, where an
    operator edits them (Ray applies it over the builder's options).
    """
    archives = [s if is_remote(s) or s.startswith("file://") else str(local_path(s)) for s in sources]
    deployments = [
        {"name": name, **plan.deployment_options()}
        for plan, name in zip(plans, deployment_names, strict=True)
    ]
    if len(plans) > 1:
        deployments.append({"name": "router", "ray_actor_options": {"num_cpus": 0}})
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": app_name,
                "route_prefix": "/",
                "import_path": RAY_IMPORT_PATH,
                "args": {
                    "archives": archives,
                    **{k: v for k, v in (overrides or {}).items() if v is not None},
                },
                "deployments": deployments,
            }
        ],
    }
    check_ray_config(config)
    return config


def check_ray_config(config: dict[str, Any]) -> None:
    """Raise ConfigError when Ray's own ``ServeDeploySchema`` refuses ``config``."""
    require_extra("ray", "ray.serve")
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValueError as exc:
        raise ConfigError(f"Ray refuses the serve config: {' '.join(str(exc).split())}") from exc


# ---- KServe -------------------------------------------------------------------------------------------
def k8s_name(model_name: str) -> str:
    """A model name as a Kubernetes resource name (DNS-1035: lower case, digits, '-')."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}".rstrip("-")
    return name[:63].rstrip("-")


def kserve_runtime(
    image: str = DEFAULT_IMAGE, name: str = KSERVE_RUNTIME, trusted_keys: list[str] | None = None
) -> Any:
    """The ``ServingRuntime``: KServe's ModelServer running archives from /mnt/models; with
    ``trusted_keys`` (PEM texts), mounted from the ConfigMap ``kserve_trusted_keys`` writes, it loads
    only archives they signed."""
    require_extra("kserve")
    from kserve import models as km
    from kubernetes.client import (
        V1ConfigMapVolumeSource,
        V1Container,
        V1ContainerPort,
        V1ObjectMeta,
        V1Volume,
        V1VolumeMount,
    )

    keys = list(trusted_keys or [])
    mounts = [V1VolumeMount(name="trusted-keys", mount_path=KSERVE_KEYS_DIR, read_only=True)]
    container = V1Container(
        name="kserve-container",
        image=image,
        # KServe fills {{.Name}} with the InferenceService's name: the name the model answers to.
        args=[
            "--model_name={{.Name}}",
            f"--model_dir={KSERVE_MODEL_DIR}",
            f"--http_port={KSERVE_HTTP_PORT}",
            *(f"--trusted_key={KSERVE_KEYS_DIR}/{_key_file(i)}" for i in range(len(keys))),
        ],
        ports=[V1ContainerPort(container_port=KSERVE_HTTP_PORT, protocol="TCP")],
        volume_mounts=mounts if keys else None,
    )
    volumes = [V1Volume(name="trusted-keys", config_map=V1ConfigMapVolumeSource(name=KSERVE_KEYS_CONFIG_MAP))]
    return km.V1alpha1ServingRuntime(
        api_version="serving.kserve.io/v1alpha1",
        kind="ServingRuntime",
        metadata=V1ObjectMeta(name=name, annotations={"prometheus.kserve.io/port": str(KSERVE_HTTP_PORT)}),
        spec=km.V1alpha1ServingRuntimeSpec(
            supported_model_formats=[
                km.V1alpha1SupportedModelFormat(name=fmt, version="1", auto_select=auto)
                for fmt, auto in KSERVE_FORMATS
            ],
            protocol_versions=["v1", "v2"],
            containers=[container],
            volumes=volumes if keys else None,
        ),
    )


def kserve_trusted_keys(pems: list[str]) -> Any:
    """The ConfigMap holding the runtime's trusted public keys (public: a ConfigMap, not a Secret)."""
    require_extra("kserve")
    from kubernetes.client import V1ConfigMap, V1ObjectMeta

    return V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=V1ObjectMeta(name=KSERVE_KEYS_CONFIG_MAP),
        data={_key_file(i): pem for i, pem in enumerate(pems)},
    )


def _key_file(index: int) -> str:
    return f"key-{index + 1}.pub"


def kserve_inference_service(
    name: str, storage_uri: str, runtime: str = KSERVE_RUNTIME, gpus: int = 0
) -> Any:
    """The ``InferenceService`` that serves the archive at ``storage_uri`` with the runtime above;
    ``gpus`` (``ServePlan.gpus``) become the model's ``nvidia.com/gpu`` limit, the GPUs its pod gets."""
    require_extra("kserve")
    from kserve import models as km
    from kubernetes.client import V1ObjectMeta, V1ResourceRequirements

    # An extended resource is asked for by its limit (Kubernetes sets the request to it).
    resources = V1ResourceRequirements(limits={GPU_RESOURCE: str(gpus)}) if gpus else None

    return km.V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1",
        kind="InferenceService",
        metadata=V1ObjectMeta(name=name),
        spec=km.V1beta1InferenceServiceSpec(
            predictor=km.V1beta1PredictorSpec(
                model=km.V1beta1ModelSpec(
                    model_format=km.V1beta1ModelFormat(name="mar"),
                    runtime=runtime,
                    storage_uri=storage_uri,
                    resources=resources,
                )
            )
        ),
    )


def to_document(model: Any) -> dict[str, Any]:
    """A kserve SDK object as the plain, camelCase mapping ``kubectl`` reads."""
    from kserve import ApiClient

    return _without_empty(ApiClient().sanitize_for_serialization(model))


def _without_empty(value: Any) -> Any:
    """Drop the SDK's empty-string defaults (a model spec's ``name: ''``), which Kubernetes reads as set."""
    if isinstance(value, dict):
        return {k: _without_empty(v) for k, v in value.items() if v != ""}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


def kserve_dockerfile(package: str, base_image: str = "python:3.12-slim", gpu: bool = False) -> str:
    """The runtime image: this package with its ``kserve`` extra, torch (CPU-only, or PyPI's CUDA
    build for a model that asks for a GPU), our ModelServer command."""
    entrypoint = ", ".join(f'"{part}"' for part in KSERVE_ENTRYPOINT)
    index = "" if gpu else "--extra-index-url https://download.pytorch.org/whl/cpu "
    torch_kind = "CUDA torch (PyPI's default build)" if gpu else "CPU-only torch"

    return f"""\
# The model-archiver KServe runtime (written by `model-archiver deploy kserve`).
# Build: docker build -t IMAGE .   (then push IMAGE and name it in the ServingRuntime)
FROM {base_image}
# {torch_kind}
RUN pip install --no-cache-dir {index}"{package}"
# KServe mounts the InferenceService's storageUri here; the runtime serves every archive in it.
ENV MODEL_ARCHIVER_CACHE=/tmp/model-archiver-cache
USER 1000
EXPOSE {KSERVE_HTTP_PORT}
ENTRYPOINT [{entrypoint}]
CMD ["--model_dir={KSERVE_MODEL_DIR}", "--http_port={KSERVE_HTTP_PORT}"]
"""


def package_spec(signed: bool = False) -> str:
    """The runtime image's pip requirement (with the ``signing`` extra when it verifies signatures)."""
    return f"torchmar[{'kserve,signing' if signed else 'kserve'}]=={__version__}"


def check_storage_uri(uri: str) -> None:
    if "://" not in uri:
        raise UsageError(
            f"--storage-uri must be a URI KServe's storage initializer fetches (s3://, gs://, pvc://, "
            f"https://, ...), got {uri!r}"
        )
