"""On every host a model that asks for a GPU gets one: `deploy ray` reserves it for each replica,
`deploy kserve` limits the pod to it, and a replica uses the one its engine gave it (or refuses)."""

from __future__ import annotations

import pytest
import yaml

from archiver.errors import HandlerError
from archiver.integrations.archive_plan import plan_archive
from tests.integrations.test_deploy import run_cli, sdk_round_trip

ECHO_ON = {
    "gpu": "deviceType: gpu\n",
    "ids": "deviceIds: [0, 1]\n",
    "cpu": "deviceType: cpu\ndeviceIds: [0]\n",
    "half": "deviceType: gpu\nray:\n  ray_actor_options: {num_gpus: 0.5}\n",
    "torchrun": "deviceType: gpu\nparallelType: tp\nparallelLevel: 2\n",
}


@pytest.fixture
def echo_on(tmp_path, kit):
    return {key: kit.write_echo(tmp_path / key, "1.0", config) for key, config in ECHO_ON.items()}


def test_each_replicas_gpus_come_from_device_type_and_device_ids(echo_on):
    options = {
        key: plan_archive(path).deployment_options()["ray_actor_options"] for key, path in echo_on.items()
    }
    assert options["gpu"] == {"num_cpus": 1, "num_gpus": 1}
    assert options["ids"] == {"num_cpus": 1, "num_gpus": 1}  # deviceIds: a GPU model, one GPU a replica
    assert options["cpu"] == {"num_cpus": 1}
    assert options["half"] == {"num_cpus": 1, "num_gpus": 0.5}  # the archive's own ray: section wins
    assert options["torchrun"] == {"num_cpus": 1, "num_gpus": 2}
    assert plan_archive(echo_on["gpu"]).device_type == "gpu"


def test_deploy_ray_writes_the_gpu_reservation_rays_schema_accepts(tmp_path, echo_on):
    out = tmp_path / "serve_config.yaml"
    result = run_cli("deploy", "ray", str(echo_on["gpu"]), "-o", str(out))
    assert result.code == 0, result.output
    (deployment,) = yaml.safe_load(out.read_text())["applications"][0]["deployments"]
    assert deployment["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}


def test_deploy_kserve_limits_the_pod_to_the_gpus_the_model_asks_for(tmp_path, echo_on):
    out = tmp_path / "k8s"
    result = run_cli("deploy", "kserve", str(echo_on["ids"]), "--storage-uri", "s3://m/echo", "-o", str(out))
    assert result.code == 0, result.output
    service = yaml.safe_load((out / "10-inferenceservice.yaml").read_text())
    assert sdk_round_trip(service, "V1beta1InferenceService") == service
    assert service["spec"]["predictor"]["model"]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    dockerfile = (out / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" not in dockerfile and "# CUDA torch" in dockerfile

    cpu_out = tmp_path / "k8s-cpu"
    assert (
        run_cli("deploy", "kserve", str(echo_on["cpu"]), "--storage-uri", "s3://m/e", "-o", str(cpu_out)).code
        == 0
    )
    cpu_service = yaml.safe_load((cpu_out / "10-inferenceservice.yaml").read_text())
    assert "resources" not in cpu_service["spec"]["predictor"]["model"]
    assert "download.pytorch.org/whl/cpu" in (cpu_out / "Dockerfile").read_text()


def test_a_kserve_pod_without_a_gpu_refuses_a_gpu_model_and_runs_the_others_on_the_cpu(echo_on, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this pod has no GPU, whatever the machine has
    from archiver.integrations.kserve import ArchiveModel, pod_gpu_id

    with pytest.raises(HandlerError, match="says deviceType: gpu, and this KServe pod has no GPU"):
        pod_gpu_id(echo_on["gpu"])
    assert pod_gpu_id(echo_on["cpu"]) is None
    assert pod_gpu_id(echo_on["ids"]) is None  # deviceIds alone: the CPU where there is no GPU
    model = ArchiveModel("echo", echo_on["cpu"])
    assert model.load() is True
    assert model.loaded.context.system_properties["gpu_id"] is None
