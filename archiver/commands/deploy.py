"""The ``deploy`` commands: write what Ray Serve or KServe needs to serve archives, checked by their schemas.

``deploy ray`` writes a Ray Serve config file; ``deploy kserve`` a folder with a ServingRuntime, an
InferenceService and the runtime image's Dockerfile. Nothing is deployed: the user runs ``serve run``,
``docker build`` and ``kubectl apply``. Each needs its engine's extra for the schema check.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
import yaml

from archiver.commands.options import force_option, trusted_key_option
from archiver.errors import OutputExistsError, UsageError

_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# plan_archive's overrides as deploy ray's flags name them in a refusal
_FLAGS = {"batch_size": "--batch-size", "max_batch_delay_ms": "--max-batch-delay", "replicas": "--replicas"}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"{existing[0]} exists (use -f/--force to overwrite it)")


def _yaml(document: object) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def _verified_keys(archives: list[str], key_paths: tuple[str, ...]) -> list[str] | None:
    """The trusted keys as PEM text, after checking every archive verifies against them now (a config
    that could only fail on the cluster is not written); None without keys."""
    if not key_paths:
        return None
    from archiver.integrations import signatures

    keys = signatures.trusted_keys(key_paths)
    for archive in archives:
        signatures.check_archive(Path(archive), keys)
    return signatures.pem_texts(keys)


@click.group(context_settings=_SETTINGS)
def deploy() -> None:
    """Write the files that serve archives on Ray Serve or KServe."""


@deploy.command("ray", context_settings=_SETTINGS)
@click.argument("archives", nargs=-1, required=True)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default="serve_config.yaml", show_default=True
)
@click.option("--app-name", default="archives", show_default=True, help="The Ray Serve application's name.")
# Ranges checked by plan_archive with the server's bounds (settings_bounds): FloatRange lets NaN by.
@click.option("--replicas", type=int, help="Replicas per model (default: the archive's).")
@click.option("--batch-size", type=int, help="Batch size (default: the archive's, else 1).")
@click.option("--max-batch-delay", type=float, help="Batch delay in ms (default: 5).")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Ray's HTTP proxy address (0.0.0.0 on a cluster)."
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@force_option("Overwrite an existing output file.")
@trusted_key_option(
    "Replicas load only archives this EC public key signed (embedded in the config; repeatable)."
)
def deploy_ray(
    archives: tuple[str, ...],
    output: str,
    app_name: str,
    replicas: int | None,
    batch_size: int | None,
    max_batch_delay: float | None,
    host: str,
    port: int,
    force: bool,
    trusted_keys: tuple[str, ...],
) -> None:
    """Write a Ray Serve config that serves ARCHIVES (one deployment per model).

    Archive paths are written absolute (a file:// URI as given). The replicas read the archives from
    disk, so on a cluster they must be at that path on every node (a volume). Run the file with
    'serve run serve_config.yaml' or 'serve deploy serve_config.yaml', or use its applications as a
    KubeRay RayService's serveConfigV2.

    \b
    model-archiver deploy ray model-store/resnet34.mar --replicas 2 -o serve_config.yaml
    """
    from archiver.integrations import require_extra

    require_extra("ray", "ray.serve")
    from archiver.integrations.archive_plan import is_remote, plan_archive
    from archiver.integrations.manifests import ray_serve_config
    from archiver.integrations.ray_serve import deployment_name

    target = Path(output)
    _refuse_existing([target], force)
    if any(is_remote(a) for a in archives):
        raise UsageError(
            "deploy ray reads each archive's settings: give local paths (then edit the config to name "
            "the path where the replicas mount them)"
        )
    pems = _verified_keys(list(archives), trusted_keys)
    plans = [
        plan_archive(
            a, batch_size=batch_size, max_batch_delay_ms=max_batch_delay, replicas=replicas, names=_FLAGS
        )
        for a in archives
    ]
    names = [deployment_name(p, plans) for p in plans]
    overrides = {"batch_size": batch_size, "max_batch_delay_ms": max_batch_delay, "num_replicas": replicas}
    overrides["trusted_keys"] = pems
    config = ray_serve_config(
        list(archives), plans, names, app_name=app_name, host=host, port=port, overrides=overrides
    )
    _write_atomic(target, _yaml(config))
    for plan, name in zip(plans, names, strict=True):
        replicas_text = (
            f"{plan.min_replicas}-{plan.max_replicas} replicas (autoscaling)"
            if plan.autoscaling
            else f"{plan.min_replicas} replica{'s' if plan.min_replicas != 1 else ''}"
        )
        click.echo(f"{name}: {plan.source}, {replicas_text}, batch {plan.batch_size}")
    click.echo(f"wrote {target} (checked by Ray's ServeDeploySchema); run: serve run {target}")


@deploy.command("kserve", context_settings=_SETTINGS)
@click.argument("archive")
@click.option(
    "--storage-uri", required=True, help="Where KServe fetches the archive from (s3://, gs://, pvc://, ...)."
)
@click.option(
    "--image", help="The runtime image (built from the Dockerfile written here).  [torchmar-kserve:VERSION]"
)
@click.option("--name", help="The InferenceService's name.  [the archive's model name]")
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Folder to write into.")
@force_option("Overwrite existing files in the folder.")
@trusted_key_option("The runtime loads only archives this EC public key signed (a ConfigMap; repeatable).")
def deploy_kserve(
    archive: str,
    storage_uri: str,
    image: str | None,
    name: str | None,
    output: str,
    force: bool,
    trusted_keys: tuple[str, ...],
) -> None:
    """Write a ServingRuntime, an InferenceService and a Dockerfile that serve ARCHIVE on KServe.

    \b
    model-archiver deploy kserve model-store/resnet34.mar --storage-uri s3://bucket/models/resnet34 -o k8s
    docker build -t REGISTRY/torchmar-kserve k8s && docker push REGISTRY/torchmar-kserve
    kubectl apply -f k8s
    """
    from archiver.integrations import require_extra

    require_extra("kserve")
    from archiver.integrations.archive_plan import plan_archive
    from archiver.integrations.manifests import (
        DEFAULT_IMAGE,
        check_storage_uri,
        k8s_name,
        kserve_dockerfile,
        kserve_inference_service,
        kserve_runtime,
        kserve_trusted_keys,
        package_spec,
        to_document,
    )

    check_storage_uri(storage_uri)
    pems = _verified_keys([archive], trusted_keys)
    plan = plan_archive(archive)
    folder = Path(output)
    runtime = kserve_runtime(image or DEFAULT_IMAGE, trusted_keys=pems)
    files = {
        "00-servingruntime.yaml": _yaml(to_document(runtime)),
        "10-inferenceservice.yaml": _yaml(
            to_document(kserve_inference_service(k8s_name(name or plan.name), storage_uri, gpus=plan.gpus))
        ),
        "Dockerfile": kserve_dockerfile(package_spec(signed=bool(pems)), gpu=plan.gpus > 0),
    }
    if pems:
        files["05-trusted-keys.yaml"] = _yaml(to_document(kserve_trusted_keys(pems)))
    _refuse_existing([folder / f for f in files], force)
    for filename, text in files.items():
        _write_atomic(folder / filename, text)
    click.echo(
        f"wrote {', '.join(files)} into {folder} for model {plan.name} (checked by the kserve SDK's models)"
    )
    if pems:
        click.echo(f"the runtime verifies the signature: put {Path(archive).name}.sig beside the archive")
    click.echo(f"next: docker build -t IMAGE {folder}; push IMAGE; kubectl apply -f {folder}")
