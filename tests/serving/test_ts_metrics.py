"""Metrics as TorchServe names them: metrics.yaml pre-registers, /metrics carries TorchServe's names."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from archiver.errors import ConfigError
from archiver.serving.front.metrics import ServerMetrics
from archiver.ts_metrics_config import load_metrics_config
from handlers.context import Dimension, Metrics, MetricsCacheKeyError, MetricTypes
from tests.serving.gpu_fakes import gpu, install_fake_nvidia_smi

CLI = [sys.executable, "-m", "archiver"]
HOST = socket.gethostname()

# TorchServe's examples/custom_metrics/mnist_handler.py, call for call, without the MNIST model: the
# metrics API is what is under test.
CUSTOM_METRICS_HANDLER = """
import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes


class MNISTDigitClassifier:
    def initialize(self, context):
        self.context = context
        metrics = context.metrics
        self.inf_request_count = metrics.add_metric_to_cache(
            metric_name="InferenceRequestCount", unit="count", dimension_names=[],
            metric_type=MetricTypes.COUNTER,
        )
        metrics.add_metric_to_cache(
            metric_name="PreprocessCallCount", unit="count", dimension_names=["ModelName"],
            metric_type=MetricTypes.COUNTER,
        )
        metrics.add_metric(name="InitializeCallCount", value=1, unit="count", metric_type=MetricTypes.COUNTER)

    def preprocess(self, data):
        start = time.time()
        metrics = self.context.metrics
        self.inf_request_count.add_or_update(value=1, dimension_values=[])
        metrics.get_metric(metric_name="PreprocessCallCount", metric_type=MetricTypes.COUNTER).add_or_update(
            value=1, dimension_values=[self.context.model_name]
        )
        metrics.get_metric(metric_name="RequestBatchSize", metric_type=MetricTypes.GAUGE).add_or_update(
            value=len(data), dimension_values=[self.context.model_name]
        )
        body = data[0].get("body") or data[0].get("data")
        metrics.add_size(name="SizeOfImage", value=len(body) / 1024, idx=None, unit="kB")
        metrics.add_time(
            name="HandlerMethodTime", value=(time.time() - start) * 1000, idx=None, unit="ms",
            dimensions=[Dimension(name="MethodName", value="preprocess")], metric_type=MetricTypes.GAUGE,
        )
        return [len(row.get("body") or row.get("data")) for row in data]

    def postprocess(self, data):
        self.context.metrics.add_counter(name="PostprocessCallCount", value=1, idx=None, dimensions=[])
        self.context.metrics.add_percent(
            name="ExamplePercentMetric", value=50, idx=None, dimensions=[], metric_type=MetricTypes.HISTOGRAM
        )
        return data

    def handle(self, data, context):
        return self.postprocess(self.preprocess(data))
"""

# examples/custom_metrics/metrics.yaml's model_metrics (its ts_metrics are TorchServe's defaults).
METRICS_YAML = """\
dimensions:
  - &model_name "ModelName"
  - &level "Level"
ts_metrics:
  counter:
    - name: Requests2XX
      unit: Count
      dimensions: [Level, Hostname]
    - name: ts_inference_requests_total
      unit: Count
      dimensions: ["model_name", "model_version", "hostname"]
    - name: ts_inference_latency_microseconds
      unit: Microseconds
      dimensions: ["model_name", "model_version", "hostname"]
    - name: ts_queue_latency_microseconds
      unit: Microseconds
      dimensions: ["model_name", "model_version", "hostname"]
  gauge:
    - name: WorkerThreadTime
      unit: Milliseconds
      dimensions: [Level, Hostname]
model_metrics:
  counter:
    - name: InferenceRequestCount
      unit: count
      dimensions: []
    - name: InitializeCallCount
      unit: count
      dimensions: [*model_name, *level]
    - name: PreprocessCallCount
      unit: count
      dimensions: [*model_name]
    - name: PostprocessCallCount
      unit: CallCount
      dimensions: [*model_name, *level]
  gauge:
    - name: HandlerTime
      unit: ms
      dimensions: [*model_name, *level]
    - name: PredictionTime
      unit: ms
      dimensions: [*model_name, *level]
    - name: RequestBatchSize
      unit: count
      dimensions: ["ModelName"]
    - name: SizeOfImage
      unit: kB
      dimensions: [*model_name, *level]
"""


def sample(text: str, line_start: str) -> float:
    found = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    assert len(found) == 1, f"{line_start!r} in:\n{text}"
    return float(found[0].rsplit(" ", 1)[1])


@pytest.fixture
def custom_metrics_server(tmp_path, make_model, serve_process):
    """The custom_metrics example's layout: its config.properties (prometheus mode, metrics_config,
    auto-detection, the models= JSON) and metrics.yaml, served as its README does."""

    def start(auto_detect: bool = True):
        make_model("mnist", handler_source=CUSTOM_METRICS_HANDLER)
        (tmp_path / "metrics.yaml").write_text(METRICS_YAML)
        config = tmp_path / "config.properties"
        config.write_text(
            "metrics_mode=prometheus\n"
            f"metrics_config={tmp_path / 'metrics.yaml'}\n"
            f"model_metrics_auto_detect={'true' if auto_detect else 'false'}\n"
            'models={\\\n  "mnist": {\\\n    "1.0": {\\\n        "defaultVersion": true,\\\n'
            '        "marName": "mnist.mar",\\\n        "minWorkers": 1,\\\n        "maxWorkers": 1\\\n'
            "    }\\\n  }\\\n}\n"
        )
        store = tmp_path / "models"
        _, ready = serve_process(
            "--model-store", str(store), "--models", "mnist=mnist", "--ts-config", str(config)
        )
        return ready

    return start


def test_the_custom_metrics_example_answers_and_its_metrics_carry_torchserve_s_names(
    custom_metrics_server, call
):
    ready = custom_metrics_server()
    base = f"http://127.0.0.1:{ready['inference_port']}"
    for _ in range(3):
        assert call("POST", base + "/predictions/mnist", b"x" * 2048).status == 200
    assert call("POST", base + "/predictions/mnist/1.0", b"x" * 1024).status == 200
    assert call("POST", base + "/predictions/nothere", b"x").status == 404
    text = call("GET", f"http://127.0.0.1:{ready['metrics_port']}/metrics").body.decode()

    # the handler's model_metrics, under their declared dimensions plus Hostname, as TorchServe shows them
    assert "# TYPE InferenceRequestCount counter" in text
    assert sample(text, f'InferenceRequestCount{{Hostname="{HOST}"}}') == 4.0
    assert sample(text, f'PreprocessCallCount{{ModelName="mnist",Hostname="{HOST}"}}') == 4.0
    assert sample(text, f'PostprocessCallCount{{ModelName="mnist",Level="Model",Hostname="{HOST}"}}') == 4.0
    assert sample(text, f'InitializeCallCount{{ModelName="mnist",Level="Model",Hostname="{HOST}"}}') == 1.0
    assert sample(text, f'RequestBatchSize{{ModelName="mnist",Hostname="{HOST}"}}') == 1.0
    assert sample(text, f'SizeOfImage{{ModelName="mnist",Level="Model",Hostname="{HOST}"}}') == 1.0
    assert sample(text, f'PredictionTime{{ModelName="mnist",Level="Model",Hostname="{HOST}"}}') >= 0.0
    # not declared: there because the example's config auto-detects model metrics
    assert (
        sample(
            text,
            f'HandlerMethodTime{{MethodName="preprocess",ModelName="mnist",Level="Model",Hostname="{HOST}"}}',
        )
        >= 0.0
    )
    assert (
        sample(text, f'ExamplePercentMetric_count{{ModelName="mnist",Level="Model",Hostname="{HOST}"}}') == 4
    )
    # HELP's unit: the declaration's for a declared metric, TorchServe's long name for a detected one
    assert "# HELP SizeOfImage Torchserve prometheus gauge metric with unit: kB" in text
    assert "# HELP HandlerMethodTime Torchserve prometheus gauge metric with unit: Milliseconds" in text
    # HandlerTime is declared but this handler is not a BaseHandler: declared, no sample, as TorchServe
    assert "# TYPE HandlerTime gauge" in text and "\nHandlerTime{" not in text

    # the server's: by the version the request named ("default" when none), unknown models not counted
    assert (
        sample(
            text,
            f'ts_inference_requests_total{{model_name="mnist",model_version="default",hostname="{HOST}"}}',
        )
        == 3
    )
    assert (
        sample(
            text, f'ts_inference_requests_total{{model_name="mnist",model_version="1.0",hostname="{HOST}"}}'
        )
        == 1
    )
    latency = (
        f'ts_inference_latency_microseconds{{model_name="mnist",model_version="default",hostname="{HOST}"}}'
    )
    assert sample(text, latency) > 0
    assert sample(text, f'Requests2XX{{Level="Host",Hostname="{HOST}"}}') == 4
    # the queue's wait, summed per model (the queue does not know the version a request named)
    queue = f'ts_queue_latency_microseconds{{model_name="mnist",model_version="default",hostname="{HOST}"}}'
    assert 0 < sample(text, queue) < sample(text, latency)
    # only what this metrics.yaml declares: Requests4XX is TorchServe's default, not this file's
    assert "Requests4XX" not in text and "# TYPE WorkerThreadTime gauge" in text
    # ours, beside them, and the whole page one valid exposition (no family twice, every line parses)
    assert 'model_archiver_requests_total{model="mnist",status="200"} 4.0' in text
    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))

    filtered = call(
        "GET", f"http://127.0.0.1:{ready['metrics_port']}/metrics?name[]=Requests2XX"
    ).body.decode()
    assert [line for line in filtered.splitlines() if not line.startswith("#")] == [
        f'Requests2XX{{Level="Host",Hostname="{HOST}"}} 4.0'
    ]


def test_without_auto_detection_only_declared_metrics_get_torchserve_s_names(custom_metrics_server, call):
    ready = custom_metrics_server(auto_detect=False)
    assert call("POST", f"http://127.0.0.1:{ready['inference_port']}/predictions/mnist", b"abc").status == 200
    text = call("GET", f"http://127.0.0.1:{ready['metrics_port']}/metrics").body.decode()
    assert sample(text, f'RequestBatchSize{{ModelName="mnist",Hostname="{HOST}"}}') == 1.0
    assert "\nHandlerMethodTime{" not in text  # TorchServe drops what metrics.yaml does not declare
    assert 'model_archiver_handler_HandlerMethodTime{MethodName="preprocess",model="mnist"}' in text


def test_a_handler_asking_for_an_unregistered_metric_gets_torchserve_s_error(
    serve_process, make_model, call, poll
):
    # TorchServe's default metrics.yaml declares no RequestBatchSize: the example's handler fails there too
    model = make_model("mnist", handler_source=CUSTOM_METRICS_HANDLER)
    proc, ready = serve_process(str(model))
    answer = call("POST", f"http://127.0.0.1:{ready['inference_port']}/predictions/mnist", b"abc")
    assert answer.status == 503  # a failing TorchServe handler's answer, as TorchServe gives it
    message = "Metric of type 'MetricTypes.GAUGE' and name 'RequestBatchSize' doesn't exist"
    poll(lambda: message in proc.log.read_text(), what="the handler's error in the server's log")


def test_metrics_yaml_declarations_are_in_the_cache_and_checked_as_torchserve_checks_them():
    metrics = Metrics(
        model_name="m",
        declared=[("RequestBatchSize", "gauge", "count", ("ModelName",)), ("Calls", "counter", "count", ())],
    )
    assert metrics.get_metric("RequestBatchSize", MetricTypes.GAUGE).unit == "Count"  # TorchServe's name
    with pytest.raises(MetricsCacheKeyError, match=re.escape("name 'RequestBatchSize' doesn't exist")):
        metrics.get_metric("RequestBatchSize", MetricTypes.COUNTER)  # declared as a gauge
    metrics.get_metric("RequestBatchSize", MetricTypes.GAUGE).add_or_update(4, ["m"])
    metrics.add_counter("Calls", 1)  # two default dimensions against none declared: dropped
    metrics.add_time("Stage", 2.0, None, "ms", [Dimension("Step", "pre")])  # not declared: registered
    records = {r.get("name", r.get("reason")): r for r in metrics.drain()}
    assert records["RequestBatchSize"] == {
        "name": "RequestBatchSize",
        "kind": "gauge",
        "unit": "Count",
        "value": 4.0,
    }
    assert records["invalid"]["value"] == 1  # the mismatched Calls
    assert records["Stage"]["dims"] == [["Step", "pre"]]
    assert metrics.get_metric("Stage", MetricTypes.GAUGE).dimension_names == ["Step", "ModelName", "Level"]


def test_a_metrics_yaml_without_model_metrics_stops_the_start_with_one_line(tmp_path, echo_model):
    (tmp_path / "metrics.yaml").write_text("ts_metrics:\n  counter: []\n")
    config = tmp_path / "config.properties"
    config.write_text(f"metrics_config={tmp_path / 'metrics.yaml'}\n")
    result = subprocess.run(
        [*CLI, "serve", str(echo_model), "--ts-config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MODEL_ARCHIVER_TOKEN": ""},
    )
    assert result.returncode == 2
    yaml_path = tmp_path / "metrics.yaml"
    assert result.stderr.strip().splitlines() == [
        "model-archiver: error: metrics_config (line 1 of config.properties): "
        f"the metrics config {yaml_path} has no model_metrics section (TorchServe needs one)"
    ]


def test_a_record_that_does_not_match_its_declaration_gets_no_torchserve_name(tmp_path):
    (tmp_path / "metrics.yaml").write_text(METRICS_YAML)
    metrics = ServerMetrics(ts_config=load_metrics_config(tmp_path / "metrics.yaml"))
    metrics.observe_handler_metrics(
        "m",
        [
            {"name": "PreprocessCallCount", "kind": "counter", "unit": "count", "value": 2.0},
            {
                "name": "PreprocessCallCount",
                "kind": "counter",
                "unit": "count",
                "value": 1.0,
                "dims": [["X", "y"]],
            },
            {
                "name": "RequestBatchSize",
                "kind": "counter",
                "unit": "count",
                "value": 1.0,
            },  # declared a gauge
        ],
    )
    text = metrics.render().decode()
    assert sample(text, f'PreprocessCallCount{{ModelName="m",Hostname="{HOST}"}}') == 2.0
    assert sample(text, 'model_archiver_handler_PreprocessCallCount_total{model="m"}') == 2.0
    assert sample(text, 'model_archiver_handler_RequestBatchSize_total{model="m"}') == 1.0
    assert sample(text, 'model_archiver_handler_metrics_dropped_total{model="m",reason="conflict"}') == 1
    assert (
        sample(text, 'model_archiver_handler_metrics_dropped_total{model="m",reason="torchserve_labels"}')
        == 2
    )
    assert "\nRequestBatchSize{" not in text


def test_a_metrics_yaml_declaring_a_name_twice_is_refused(tmp_path):
    (tmp_path / "metrics.yaml").write_text(
        "model_metrics:\n  counter:\n    - {name: Requests2XX, unit: c, dimensions: []}\n"
        "ts_metrics:\n  counter:\n    - {name: Requests2XX, unit: c, dimensions: []}\n"
    )
    with pytest.raises(ConfigError, match="declares Requests2XX twice"):
        load_metrics_config(tmp_path / "metrics.yaml")


def test_the_host_and_gpu_gauges_carry_torchserve_s_names(
    serve, echo_model, call, poll, tmp_path, monkeypatch
):
    fake = install_fake_nvidia_smi(tmp_path / "fake-nvidia")  # nvidia-smi answering for one GPU
    monkeypatch.setenv("PATH", fake.path_env())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake.write([gpu(0, memory_mb=8000, used_mb=2000, util=12)])
    server = serve([echo_model])

    def scraped() -> str | None:
        text = call("GET", server.url("metrics") + "/metrics").body.decode()
        return text if f'GPUMemoryUsed{{Level="Host",DeviceId="0",Hostname="{HOST}"}}' in text else None

    text = poll(scraped, what="the GPU gauges")
    assert sample(text, f'GPUMemoryUsed{{Level="Host",DeviceId="0",Hostname="{HOST}"}}') == 2000.0
    assert sample(text, f'GPUMemoryUtilization{{Level="Host",DeviceId="0",Hostname="{HOST}"}}') == 25.0
    assert sample(text, f'GPUUtilization{{Level="Host",DeviceId="0",Hostname="{HOST}"}}') == 12.0
    assert 0 < sample(text, f'MemoryUtilization{{Level="Host",Hostname="{HOST}"}}') < 100
    assert sample(text, f'WorkerLoadTime{{WorkerName="W-1-echo_1.0",Level="Host",Hostname="{HOST}"}}') > 0
