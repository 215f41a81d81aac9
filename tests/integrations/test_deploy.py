"""`model-archiver deploy ray|kserve`: the files it writes pass the engines' own schemas, carry each
archive's settings, and the KServe runtime's own arguments serve a model under the InferenceService's
name on KServe's real ModelServer."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from archiver.cli import main

MODEL_ARCHIVER = Path(sys.executable).parent / "model-archiver"


def run_cli(*args: str) -> SimpleNamespace:
    """The console script's entry point in-process: its exit code and what it printed (both streams)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return SimpleNamespace(code=code, output=out.getvalue())


@pytest.fixture
def autoscaled_echo(tmp_path, kit) -> Path:
    return kit.write_echo(tmp_path, "3.0", "minWorkers: 1\nmaxWorkers: 3\nbatchSize: 16\nmaxBatchDelay: 10\n")


def test_deploy_ray_writes_a_config_rays_schema_accepts_with_each_archives_settings(
    tmp_path, seed_archive, echo_archives, autoscaled_echo
):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve_config.yaml"
    result = run_cli(
        "deploy", "ray", str(seed_archive), *map(str, echo_archives), str(autoscaled_echo), "-o", str(out)
    )
    assert result.code == 0, result.output
    config = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "archiver.integrations.ray_serve:build_app"
    archives = app["args"]["archives"]
    assert archives == [str(seed_archive), *map(str, echo_archives), str(autoscaled_echo)]
    assert all(Path(a).is_absolute() for a in archives)
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"resnet34", "echo_1_0", "echo_2_0", "echo_3_0", "router"}
    assert deployments["resnet34"]["num_replicas"] == 1
    assert deployments["resnet34"]["ray_actor_options"] == {"num_cpus": 1}
    assert deployments["echo_1_0"]["ray_actor_options"] == {"num_cpus": 0}  # its model-config.yaml's ray:
    scaled = deployments["echo_3_0"]
    assert "num_replicas" not in scaled
    assert (
        scaled["autoscaling_config"]["min_replicas"] == 1
        and scaled["autoscaling_config"]["max_replicas"] == 3
    )
    assert scaled["max_ongoing_requests"] >= 16  # room for a batch of 16 to fill
    assert deployments["router"]["ray_actor_options"] == {"num_cpus": 0}
    assert "echo_3_0: " in result.output and "autoscaling" in result.output


def test_deploy_ray_overrides_relative_paths_and_refusals(tmp_path, seed_archive, monkeypatch):
    monkeypatch.chdir(seed_archive.parent)
    out = tmp_path / "c.yaml"
    result = run_cli(
        "deploy", "ray", seed_archive.name, "--replicas", "2", "--batch-size", "8", "-o", str(out)
    )
    assert result.code == 0, result.output
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["args"] == {"archives": [str(seed_archive)], "batch_size": 8, "num_replicas": 2}
    assert app["deployments"][0]["num_replicas"] == 2 and app["deployments"][0]["max_ongoing_requests"] == 16

    again = run_cli("deploy", "ray", seed_archive.name, "-o", str(out))
    assert again.code == 1 and "exists" in again.output
    remote = run_cli("deploy", "ray", "s3://bucket/a.mar", "-o", str(tmp_path / "d.yaml"))
    assert remote.code == 2 and "local paths" in remote.output
    missing = run_cli("deploy", "ray", str(tmp_path / "nope.mar"), "-o", str(tmp_path / "e.yaml"))
    assert missing.code == 1 and "no such file" in missing.output


_LIST = re.compile(r"^(?:list|List)\[(.+)\]$")
_DICT = re.compile(r"^(?:dict\(str, (.+)\)|Dict\[str, (.+)\])$")
_PRIMITIVES = {"str", "int", "float", "bool", "object", "datetime", "date"}


def _build(value, type_name: str):
    """``value`` (camelCase, as kubectl reads it) as an instance of the SDK model ``type_name``, built
    through each class's own ``openapi_types`` and ``attribute_map``: a key the model does not declare
    fails the test, and the models' own validation (required fields, enums) runs in their constructors."""
    import kserve.models
    import kubernetes.client.models

    if value is None or type_name in _PRIMITIVES:
        return value
    if found := _LIST.match(type_name):
        return [_build(v, found.group(1)) for v in value]
    if found := _DICT.match(type_name):
        inner = found.group(1) or found.group(2)
        return {k: _build(v, inner) for k, v in value.items()}
    # The kserve SDK's models embed Kubernetes' own (V1ObjectMeta, V1Container).
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name)
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_key))
    assert not unknown, f"{type_name} has no field {unknown}"
    return cls(**{by_key[k]: _build(v, cls.openapi_types[by_key[k]]) for k, v in value.items()})


def sdk_round_trip(document: dict, kind: str) -> dict:
    """The document as the kserve SDK's ``kind`` object, written back as deploy writes one (the SDK's
    serializer, without the empty-string defaults it adds, such as a model spec's ``name: ''``)."""
    from archiver.integrations.manifests import to_document

    return to_document(_build(document, kind))


def test_deploy_kserve_writes_sdk_valid_yaml_and_a_dockerfile_running_the_tested_command(
    tmp_path, seed_archive
):
    out = tmp_path / "k8s"
    result = subprocess.run(
        [
            str(MODEL_ARCHIVER),
            "deploy",
            "kserve",
            str(seed_archive),
            "--storage-uri",
            "s3://models/resnet34",
            "--image",
            "registry.example/torchmar-kserve:1",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    runtime = yaml.safe_load((out / "00-servingruntime.yaml").read_text())
    service = yaml.safe_load((out / "10-inferenceservice.yaml").read_text())
    assert sdk_round_trip(runtime, "V1alpha1ServingRuntime") == runtime
    assert sdk_round_trip(service, "V1beta1InferenceService") == service

    assert runtime["kind"] == "ServingRuntime" and service["kind"] == "InferenceService"
    formats = {f["name"]: f for f in runtime["spec"]["supportedModelFormats"]}
    assert set(formats) == {"mar", "pytorch"} and formats["mar"]["autoSelect"] is True
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == "registry.example/torchmar-kserve:1"
    assert "--model_dir=/mnt/models" in container["args"]
    model = service["spec"]["predictor"]["model"]
    assert model == {
        "modelFormat": {"name": "mar"},
        "runtime": "model-archiver",
        "storageUri": "s3://models/resnet34",
    }
    assert service["metadata"]["name"] == "resnet34"

    dockerfile = (out / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    command = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    # The command tests/integrations start KServe with (conftest.start_kserve): python -m this module.
    assert entrypoint == ["python", "-m", "archiver.integrations.kserve"]
    assert command == ["--model_dir=/mnt/models", "--http_port=8080"]
    assert re.search(r'pip install .*"torchmar\[kserve\]==', dockerfile)


def test_deploy_kserve_refuses_a_storage_uri_that_is_not_one(tmp_path, seed_archive):
    result = run_cli(
        "deploy", "kserve", str(seed_archive), "--storage-uri", "models/x", "-o", str(tmp_path / "o")
    )
    assert result.code == 2 and "--storage-uri" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_runtimes_arguments_serve_the_model_under_the_inference_services_name(
    tmp_path, kit, echo_archives
):
    out = tmp_path / "k8s"
    result = run_cli(
        "deploy", "kserve", str(echo_archives[0]), "--storage-uri", "pvc://models/echo", "-o", str(out)
    )
    assert result.code == 0, result.output
    runtime = yaml.safe_load((out / "00-servingruntime.yaml").read_text())
    service = yaml.safe_load((out / "10-inferenceservice.yaml").read_text())
    # What KServe does: fill {{.Name}} with the InferenceService's name, mount the storage at model_dir.
    name = service["metadata"]["name"]
    mounted = tmp_path / "mnt-models"
    mounted.mkdir()
    import shutil

    shutil.copytree(echo_archives[0], mounted / "echo")
    args = [
        a.replace("{{.Name}}", name).replace("=/mnt/models", f"={mounted}")
        for a in runtime["spec"]["containers"][0]["args"]
        if not a.startswith("--http_port")
    ]
    engine = kit.start_kserve(tmp_path, mounted, extra=tuple(args))
    try:
        reply = kit.http(
            "POST",
            f"{engine.url}/v1/models/{name}:predict",
            json.dumps({"instances": ["hi"]}).encode(),
            {"Content-Type": "application/json"},
        )
        assert reply.status == 200, reply.body
        assert reply.json()["predictions"][0]["echo"] == "hi"
    finally:
        engine.stop()


@pytest.mark.parametrize(("engine", "module"), [("ray", "ray"), ("kserve", "kserve")])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, seed_archive, engine, module):
    # The engine's package made unimportable, as in an install without the extra.
    script = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from archiver.cli import main\n"
        f"main(['deploy', {engine!r}, {str(seed_archive)!r}, '--storage-uri', 's3://b/m', '-o', "
        f"{str(tmp_path / 'out')!r}] if {engine!r} == 'kserve' else "
        f"['deploy', 'ray', {str(seed_archive)!r}, '-o', {str(tmp_path / 'out.yaml')!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"pip install 'torchmar[{engine}]'" in lines[0]
