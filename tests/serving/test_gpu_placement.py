"""GPUs on a machine without one: which worker gets which gpu_id, the refusals, and what the APIs show.

The server finds GPUs through ``nvidia-smi``; here a stand-in on PATH (``gpu_fakes.py``) lists H100s,
so discovery, CUDA_VISIBLE_DEVICES, placement and the gpu_id in each worker's context all run for
real. The workers' torch has no CUDA, so a BaseHandler given gpu_id 1 loads on the CPU and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from archiver.errors import UsageError
from archiver.serving.supervisor.devices import discover_gpus, select_gpus, server_gpus
from archiver.serving.supervisor.placement import SharedGpuCounter, gpus_per_replica, replica_gpu_id
from archiver.serving.supervisor.registry import ModelSettings
from tests.serving.conftest import http, wait_until
from tests.serving.gpu_fakes import gpu, install_fake_nvidia_smi

# Answers with the gpu_id the server put in this worker's context, and the worker's pid.
GPU_ID_HANDLER = """
import os

def handle(data, context):
    if data is None:  # TorchServe's function handlers are called once with no data to initialize
        return None
    return [{"gpu_id": context.system_properties.get("gpu_id"), "pid": os.getpid()} for _ in data]
"""


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    fake = install_fake_nvidia_smi(tmp_path / "fake-nvidia")
    monkeypatch.setenv("PATH", fake.path_env())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


# ---- placement: TorchServe's rules, worker by worker -------------------------------------------------
def test_a_model_with_device_ids_takes_them_in_turn_and_a_restart_keeps_its_gpu():
    placement = SharedGpuCounter([0, 1, 2, 3]).for_model(None, (2, 3))
    assert [placement.gpu_for(slot) for slot in (1, 2, 3)] == [2, 3, 2]
    assert placement.gpu_for(2) == 3  # worker 2 restarted: the same GPU
    placement.release(3)  # scaled down
    assert placement.gpu_for(4) == 3  # the next one started takes the model counter's next
    assert placement.describe() == {"deviceType": "gpu", "deviceIds": [2, 3]}


def test_models_without_device_ids_share_the_servers_counter_which_starts_past_gpu_0():
    server = SharedGpuCounter([0, 1])
    first, second = server.for_model(None, None), server.for_model("gpu", None)
    # TorchServe increments before use: the first worker on a 2-GPU server gets GPU 1.
    assert [first.gpu_for(1), first.gpu_for(2)] == [1, 0]
    assert [second.gpu_for(1), second.gpu_for(2)] == [1, 0]
    only = SharedGpuCounter([0]).for_model(None, None)
    assert [only.gpu_for(1), only.gpu_for(2)] == [0, 0]
    chosen = SharedGpuCounter([0, 2]).for_model(None, None)  # --gpus 0,2
    assert [chosen.gpu_for(1), chosen.gpu_for(2), chosen.gpu_for(3)] == [2, 0, 2]


def test_device_type_cpu_opts_out_and_a_cpu_server_places_nothing():
    assert SharedGpuCounter([0, 1]).for_model("cpu", (0, 1)).gpu_for(1) is None
    assert SharedGpuCounter([0, 1]).for_model("neuron", None).gpu_for(1) is None
    cpu_server = SharedGpuCounter([])
    assert cpu_server.for_model(None, None).gpu_for(1) is None
    assert cpu_server.for_model(None, (0, 1)).gpu_for(1) is None  # deviceIds alone: the CPU, as before
    assert cpu_server.for_model(None, None).problem is None


def test_device_type_gpu_without_a_gpu_and_device_ids_the_server_lacks_are_problems():
    no_gpu = SharedGpuCounter([]).for_model("gpu", None)
    assert "deviceType: gpu, and this server has no GPU" in no_gpu.problem
    assert no_gpu.gpu_for(1) is None
    stranger = SharedGpuCounter([0, 1]).for_model("gpu", (1, 5))
    assert stranger.problem.startswith("its model-config.yaml's deviceIds name GPU 5")
    assert "(its GPUs: 0, 1)" in stranger.problem


def test_engines_get_one_gpu_per_replica_when_the_model_asks_and_use_the_first_they_see():
    assert gpus_per_replica({"deviceType": "gpu"}) == 1
    assert gpus_per_replica({"deviceIds": [0, 1]}) == 1
    assert gpus_per_replica({"deviceType": "cpu", "deviceIds": [0]}) == 0
    assert gpus_per_replica({}) == 0
    assert gpus_per_replica({"deviceType": "gpu", "parallelType": "tp", "parallelLevel": 4}) == 4
    assert replica_gpu_id("gpu", 1, "this Ray replica") == 0
    assert replica_gpu_id(None, 1, "this pod") == 0
    assert replica_gpu_id(None, 0, "this pod") is None
    assert replica_gpu_id("cpu", 2, "this pod") is None
    with pytest.raises(Exception, match="deviceType: gpu, and this Ray replica has no GPU"):
        replica_gpu_id("gpu", 0, "this Ray replica")


# ---- discovery through nvidia-smi ----------------------------------------------------------------------
def test_the_front_finds_gpus_through_nvidia_smi_numbered_as_cuda_visible_devices_numbers_them(fake_gpus):
    fake_gpus.write([gpu(0), gpu(1), gpu(2), gpu(3)])
    found, why = discover_gpus({})
    assert why is None
    assert [(g.index, g.physical, g.name, g.memory_total_mb) for g in found] == [
        (i, i, "NVIDIA H100 80GB HBM3", 81559.0) for i in range(4)
    ]
    found, _ = discover_gpus({"CUDA_VISIBLE_DEVICES": "2,0"})
    assert [(g.index, g.physical) for g in found] == [(0, 2), (1, 0)]
    uuid3 = gpu(3)["uuid"]
    found, _ = discover_gpus({"CUDA_VISIBLE_DEVICES": f"{uuid3[:12]},1"})  # a UUID prefix, as CUDA takes
    assert [(g.index, g.physical) for g in found] == [(0, 3), (1, 1)]
    found, _ = discover_gpus({"CUDA_VISIBLE_DEVICES": "1,7,2"})  # CUDA stops at an unknown entry
    assert [(g.index, g.physical) for g in found] == [(0, 1)]
    found, why = discover_gpus({"CUDA_VISIBLE_DEVICES": ""})
    assert found == [] and "CUDA_VISIBLE_DEVICES=''" in why
    assert [g.index for g in select_gpus("1,3", discover_gpus({})[0])] == [1, 3]
    assert [g.index for g in server_gpus(None, number_of_gpu=2, env={})] == [0, 1]
    with pytest.raises(UsageError, match=r"--gpus 4: GPU 4 is not there; this machine's GPUs are 0, 1, 2, 3"):
        server_gpus("4", env={})


def test_no_nvidia_smi_means_no_gpu_and_naming_one_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    assert server_gpus(None, env={}) == []
    with pytest.raises(
        UsageError, match=r"--gpus 0: GPU 0 is not there; no GPU was found \(nvidia-smi is not"
    ):
        server_gpus("0", env={})
    with pytest.raises(UsageError, match="--gpus must be all, none or GPU indices"):
        server_gpus("first", env={})
    assert server_gpus("none", env={}) == []


def test_serve_gpus_0_on_a_machine_without_gpus_exits_2_with_one_line(tmp_path, echo_model):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU here, whatever the machine has
    done = subprocess.run(
        [sys.executable, "-m", "archiver", "serve", str(echo_model), "--gpus", "0", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--gpus 0: GPU 0 is not there; no GPU was found (" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


# ---- a live server -------------------------------------------------------------------------------------
def _answers_by_pid(url: str, want: int) -> dict[int, int | None]:
    """gpu_id by worker pid, from predictions, until ``want`` workers have answered."""
    seen: dict[int, int | None] = {}

    def ask() -> bool:
        reply = http("POST", url, body=b"x")
        assert reply.status == 200, reply.body
        answer = reply.json()
        seen[answer["pid"]] = answer["gpu_id"]
        return len(seen) >= want

    wait_until(ask, timeout=60, what=f"{want} workers answering")
    return seen


def test_each_worker_gets_its_gpu_id_in_its_context_and_the_apis_show_it(serve, make_model, fake_gpus):
    fake_gpus.write([gpu(0, used_mb=2048, util=37), gpu(1), gpu(2), gpu(3)])
    listed = make_model("listed", handler_source=GPU_ID_HANDLER, config_yaml="deviceIds: [2, 3]\n")
    shared = make_model("shared", handler_source=GPU_ID_HANDLER)
    on_cpu = make_model("oncpu", handler_source=GPU_ID_HANDLER, config_yaml="deviceType: cpu\n")
    server = serve([listed, shared, on_cpu], defaults=ModelSettings(workers=2), gpus="0,1")
    # --gpus 0,1: deviceIds [2, 3] name GPUs this server does not use.
    described = http("GET", server.url("management") + "/models/listed").json()[0]
    assert described["status"] == "FAILED"
    assert "deviceIds name GPU 2, which this server does not use (its GPUs: 0, 1)" in described["loadError"]

    shared_described = http("GET", server.url("management") + "/models/shared").json()[0]
    assert shared_described["deviceType"] == "gpu" and shared_described["deviceIds"] == [0, 1]
    workers = {w["pid"]: w for w in shared_described["workers"]}
    assert len(workers) == 2, json.dumps(shared_described)
    assert sorted(w["gpuId"] for w in workers.values()) == [0, 1]
    assert all(w["gpu"] is True and w["device"] == f"cuda:{w['gpuId']}" for w in workers.values())
    gpu0 = next(w for w in workers.values() if w["gpuId"] == 0)
    assert gpu0["gpuUsage"].startswith("gpuId::0 utilization.gpu [%]::37 %")
    assert "memory.used [MiB]::2048 MiB" in gpu0["gpuUsage"]
    answers = _answers_by_pid(server.url() + "/predictions/shared", want=2)
    assert answers == {pid: w["gpuId"] for pid, w in workers.items()}

    cpu_described = http("GET", server.url("management") + "/models/oncpu").json()[0]
    assert cpu_described["deviceType"] == "cpu"
    assert {(w["gpu"], w["gpuId"], w["device"], w["gpuUsage"]) for w in cpu_described["workers"]} == {
        (False, None, "cpu", "N/A")
    }
    assert set(_answers_by_pid(server.url() + "/predictions/oncpu", want=2).values()) == {None}


def test_a_workers_gpu_memory_is_shown_and_exported(serve, make_model, fake_gpus):
    fake_gpus.write([gpu(0, memory_mb=81559, used_mb=1500, util=12)])
    model = make_model("held", handler_source=GPU_ID_HANDLER)
    server = serve([model])
    pid = http("GET", server.url("management") + "/models/held").json()[0]["workers"][0]["pid"]
    fake_gpus.set_apps([{"pid": pid, "uuid": gpu(0)["uuid"], "used_mb": 1200}])

    def worker_memory() -> float | None:
        return http("GET", server.url("management") + "/models/held").json()[0]["workers"][0]["gpuMemoryMB"]

    assert wait_until(worker_memory, timeout=15, what="the worker's GPU memory") == 1200.0
    metrics = http("GET", server.url("metrics") + "/metrics").body.decode()
    assert 'model_archiver_gpu_memory_used_bytes{gpu="0"} 1.572864e+09' in metrics
    assert 'model_archiver_gpu_memory_total_bytes{gpu="0"}' in metrics
    assert 'model_archiver_gpu_utilization_percent{gpu="0"} 12.0' in metrics
    worker_series = 'model_archiver_worker_gpu_memory_bytes{gpu="0",model="held",version="1.0",worker="1"}'
    assert f"{worker_series} 1.2582912e+09" in metrics


def test_gpu_memory_counts_in_the_worker_memory_limit(serve, make_model, fake_gpus):
    fake_gpus.write([gpu(0)])
    model = make_model("bloats", handler_source=GPU_ID_HANDLER)
    server = serve([model], defaults=ModelSettings(worker_memory_limit_mb=3000))
    pid = http("GET", server.url("management") + "/models/bloats").json()[0]["workers"][0]["pid"]
    # Its RSS alone is well under 3000 MB; with 2990 MB on the GPU it is over.
    fake_gpus.set_apps([{"pid": pid, "uuid": gpu(0)["uuid"], "used_mb": 2990}])

    def deaths() -> list:
        return http("GET", server.url("management") + "/models/bloats").json()[0]["deaths"]

    death = wait_until(deaths, timeout=20, what="the worker stopped for memory")[0]
    assert death["cause"] == "memory" and death["pid"] == pid
    assert "MB RSS + 2990 MB GPU over its limit of 3000 MB" in death["message"]


def test_a_model_that_says_device_type_gpu_on_a_server_without_one_is_failed_with_the_reason(
    serve, make_model, monkeypatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever this machine has
    model = make_model("needsgpu", handler_source=GPU_ID_HANDLER, config_yaml="deviceType: gpu\n")
    server = serve([model])
    described = http("GET", server.url("management") + "/models/needsgpu").json()[0]
    assert described["status"] == "FAILED"
    assert described["workers"] == []
    assert described["deviceType"] == "gpu"
    assert described["loadError"] == (
        'model "needsgpu" cannot run here: its model-config.yaml says deviceType: gpu, and this server has '
        "no GPU (none was found, or --gpus none); serve it on a GPU machine, or set deviceType: cpu"
    )
    reply = http("POST", server.url() + "/predictions/needsgpu", body=b"x")
    assert reply.status == 503
    assert "deviceType: gpu, and this server has no GPU" in reply.json()["message"]


BASE_HANDLER_MODEL = """
import torch
from handlers import BaseHandler


class Handler(BaseHandler):
    pass
"""


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_a_base_handler_given_a_gpu_without_cuda_loads_on_the_cpu_and_describe_says_so(
    serve, make_model, fake_gpus, tmp_path
):
    fake_gpus.write([gpu(0), gpu(1)])
    model = make_model("scripted", handler_source=BASE_HANDLER_MODEL)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), str(model / "model.pt"))
    manifest = json.loads((model / "MAR-INF" / "MANIFEST.json").read_text())
    manifest["model"]["serializedFile"] = "model.pt"
    (model / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    server = serve([model])
    worker = http("GET", server.url("management") + "/models/scripted").json()[0]["workers"][0]
    assert worker["gpuId"] == 1  # the first worker of a 2-GPU server, as TorchServe places it
    assert worker["device"] == "cpu"  # what the handler did: this torch has no CUDA
    reply = http(
        "POST",
        server.url() + "/predictions/scripted",
        body=b"[1.0, 2.0]",
        headers={"Content-Type": "application/json"},
    )
    assert reply.status == 200 and len(reply.json()) == 1


def test_without_gpus_the_describe_api_says_cpu_and_metrics_have_no_gpu_series(
    serve, echo_model, monkeypatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    server = serve([echo_model])
    described = http("GET", server.url("management") + "/models/echo").json()[0]
    assert described["deviceType"] == "cpu" and described["deviceIds"] == []
    assert described["workers"][0]["device"] == "cpu" and described["workers"][0]["gpuId"] is None
    assert "model_archiver_gpu" not in http("GET", server.url("metrics") + "/metrics").body.decode()


def test_gpus_in_the_config_file_name_gpus_by_the_same_rule(tmp_path, echo_model, fake_gpus):
    fake_gpus.write([gpu(0), gpu(1)])
    config = tmp_path / "server.yaml"
    config.write_text("gpus: 5\n")
    env = {**os.environ, "PATH": fake_gpus.path_env()}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(
        [sys.executable, "-m", "archiver", "serve", str(echo_model), "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("--gpus 5: GPU 5 is not there; this machine's GPUs are 0, 1")
    )


def test_nvml_is_asked_first_when_nvidia_ml_py_is_installed(monkeypatch, tmp_path):
    """A stand-in ``pynvml`` (NVML's Python binding) with two GPUs; nvidia-smi is not on PATH at all."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml([("GPU-aaaa", 40960), ("GPU-bbbb", 81920)]))
    found, why = discover_gpus({"CUDA_VISIBLE_DEVICES": "1"})
    assert why is None
    assert [(g.index, g.physical, g.uuid, g.name, g.memory_total_mb) for g in found] == [
        (0, 1, "GPU-bbbb", "NVIDIA A100", 81920.0)
    ]
    from archiver.serving.supervisor.devices import sample_usage

    usage = sample_usage(found)
    assert usage.memory_used_mb == {0: 1024.0} and usage.utilization_pct == {0: 55.0}
    assert usage.process_memory_mb == {4242: {0: 512.0}}


class _FakeNvml:
    """What archiver.serving.supervisor.devices calls of pynvml, answering for the GPUs given (uuid, MB)."""

    def __init__(self, gpus: list[tuple[str, int]]) -> None:
        self.gpus = gpus

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.gpus[handle][0].encode()  # older bindings answer bytes

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA A100"

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        from types import SimpleNamespace

        return SimpleNamespace(total=self.gpus[handle][1] * 2**20, used=1024 * 2**20)

    def nvmlDeviceGetUtilizationRates(self, handle: int):
        from types import SimpleNamespace

        return SimpleNamespace(gpu=55, memory=7)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int):
        from types import SimpleNamespace

        return [SimpleNamespace(pid=4242, usedGpuMemory=512 * 2**20)]
