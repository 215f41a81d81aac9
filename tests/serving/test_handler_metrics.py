"""Handler metrics: what a handler reports through context.metrics reaches /metrics, within a bound."""

from __future__ import annotations

import re

import pytest

from archiver.serving.front.metrics import HANDLER_SERIES_PER_MODEL, ServerMetrics
from archiver.serving.worker.loader import load_model
from handlers.context import MAX_BATCH_RECORDS, Dimension, Metrics, MetricTypes

# Every call of TorchServe's metrics API, with its positional arguments, as a TorchServe handler makes them.
METRICS_HANDLER = """
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes


class MetricsHandler:
    def initialize(self, context):
        pass

    def handle(self, data, context):
        last = data[-1].get("data", data[-1].get("body"))  # a number, reported as the time
        metrics = context.metrics
        metrics.add_time("InferenceTime", float(last), None, "ms")
        metrics.add_counter("Images", len(data), None)
        metrics.add_size("PayloadSize", 0.5, None, "MB")
        metrics.add_percent("Confidence", 87.5, 0)
        metrics.add_metric("Tokens", 7, "count", None)
        metrics.add_metric("QueueLength", 3, "count", None, [], MetricTypes.GAUGE)
        metrics.add_time("StageTime", 2.0, 0, "ms", [Dimension("Stage", "preprocess")])
        metrics.add_metric("Latency", 4.0, "ms", None, [], MetricTypes.HISTOGRAM)
        metrics.add_metric_to_cache("Cached", "count", ["Kind"], MetricTypes.COUNTER)
        metrics.get_metric("Cached", MetricTypes.COUNTER).add_or_update(1, ["a"])
        return [{"ok": True} for _ in data]
"""

# A handler that invents a metric name on every call, the thing the series bound is for.
NAME_PER_CALL_HANDLER = """
import uuid


def handle(data, context):
    if data is None:
        return None
    context.metrics.add_counter("req_" + uuid.uuid4().hex, 1)
    context.metrics.add_time("Steady", 1.0)
    return [{"ok": True} for _ in data]
"""


def series(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def sample(text: str, line_start: str) -> float:
    """The value of the one sample whose line starts with ``line_start``."""
    found = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    assert len(found) == 1, f"{line_start!r} in:\n{text}"
    return float(found[0].rsplit(" ", 1)[1])


def test_handler_metrics_appear_on_metrics_labelled_by_model(serve, make_model, call):
    model = make_model("metered", handler_source=METRICS_HANDLER)
    server = serve([model])
    for body in ("10", "20", "37.5"):
        assert call("POST", server.url("inference") + "/predictions/metered", body).status == 200
    text = call("GET", server.url("metrics") + "/metrics").body.decode()

    gauge, counter = (
        "# TYPE model_archiver_handler_{} gauge",
        "# TYPE model_archiver_handler_{}_total counter",
    )
    for name in ("InferenceTime", "PayloadSize", "Confidence", "QueueLength", "StageTime"):
        assert gauge.format(name) in text
    for name in ("Images", "Tokens", "Cached"):
        assert counter.format(name) in text
    assert "# TYPE model_archiver_handler_Latency summary" in text
    assert (
        "# HELP model_archiver_handler_InferenceTime Handler metric 'InferenceTime' (unit: Milliseconds)"
        in text
    )  # TorchServe's unit names

    assert sample(text, 'model_archiver_handler_InferenceTime{model="metered"}') == 37.5  # the last value
    assert sample(text, 'model_archiver_handler_Images_total{model="metered"}') == 3.0  # a running total
    assert sample(text, 'model_archiver_handler_PayloadSize{model="metered"}') == 0.5
    assert sample(text, 'model_archiver_handler_Confidence{model="metered"}') == 87.5
    assert sample(text, 'model_archiver_handler_Tokens_total{model="metered"}') == 21.0
    assert sample(text, 'model_archiver_handler_QueueLength{model="metered"}') == 3.0
    assert sample(text, 'model_archiver_handler_StageTime{Stage="preprocess",model="metered"}') == 2.0
    assert sample(text, 'model_archiver_handler_Latency_count{model="metered"}') == 3.0
    assert sample(text, 'model_archiver_handler_Latency_sum{model="metered"}') == 12.0
    assert sample(text, 'model_archiver_handler_Cached_total{Kind="a",model="metered"}') == 3.0
    assert "model_archiver_handler_metrics_dropped_total{" not in text


def test_the_series_bound_holds_under_a_handler_that_makes_a_name_per_call(serve, make_model, call):
    spammer = make_model("spammer", handler_source=NAME_PER_CALL_HANDLER)
    other = make_model("other", handler_source=METRICS_HANDLER)
    server = serve([spammer, other])
    requests = HANDLER_SERIES_PER_MODEL + 30
    for i in range(requests):
        assert call("POST", server.url("inference") + "/predictions/spammer", str(i)).status == 200
    assert call("POST", server.url("inference") + "/predictions/other", "1").status == 200
    text = call("GET", server.url("metrics") + "/metrics").body.decode()

    invented = series(text, "model_archiver_handler_req_")
    # "Steady" and TorchServe's PredictionTime (every batch reports it) took one series each on the
    # first call, so the invented names got the rest.
    assert len(invented) == HANDLER_SERIES_PER_MODEL - 2
    assert sample(text, 'model_archiver_handler_Steady{model="spammer"}') == 1.0  # still updated
    dropped = 'model_archiver_handler_metrics_dropped_total{model="spammer",reason="series_limit"}'
    assert sample(text, dropped) == requests - (HANDLER_SERIES_PER_MODEL - 2)
    # The bound is per model: another model's metrics still arrive.
    assert sample(text, 'model_archiver_handler_Images_total{model="other"}') == 1.0

    for _ in range(10):
        call("POST", server.url("inference") + "/predictions/spammer", "more")
    again = call("GET", server.url("metrics") + "/metrics").body.decode()
    assert len(series(again, "model_archiver_handler_req_")) == HANDLER_SERIES_PER_MODEL - 2
    assert sample(again, dropped) == requests + 10 - (HANDLER_SERIES_PER_MODEL - 2)


def test_a_handler_without_metrics_adds_only_torchserve_s_prediction_time(serve, echo_model, call):
    server = serve([echo_model])
    assert call("POST", server.url("inference") + "/predictions/echo", "hi").status == 200
    text = call("GET", server.url("metrics") + "/metrics").body.decode()
    handler_series = [
        line for line in series(text, "model_archiver_handler_") if "metrics_dropped" not in line
    ]
    assert [line.split(" ")[0] for line in handler_series] == [
        'model_archiver_handler_PredictionTime{model="echo"}'
    ]


def test_the_in_process_path_accepts_every_call(make_model):
    model = load_model(make_model("local", handler_source=METRICS_HANDLER))
    try:
        assert model.predict(["1", "12.5"]) == [{"ok": True}, {"ok": True}]
        assert model.context.metrics.values["Images"] == (2.0, "Count")
        assert model.context.metrics.values["InferenceTime"] == (12.5, "Milliseconds")
    finally:
        model.close()


# ---- the worker's side: aggregation per batch ----------------------------------------------------
def test_metrics_aggregate_a_batch_into_records_and_drain():
    metrics = Metrics()
    assert metrics.drain() == []
    metrics.add_counter("Images", 2)
    metrics.add_counter("Images", 3)
    metrics.add_time("T", 1.0)
    metrics.add_time("T", 4.0)
    metrics.add_metric("H", 2.0, "ms", None, [Dimension("Stage", "post")], MetricTypes.HISTOGRAM)
    metrics.add_metric("H", 3.0, "ms", None, [Dimension("Stage", "post")], "histogram")
    metrics.add_percent("P", 50, None, [Dimension("ModelName", "x"), ("Level", "Model")])
    records = {r["name"]: r for r in metrics.drain()}
    assert records["Images"] == {"name": "Images", "kind": "counter", "unit": "Count", "value": 5.0}
    assert records["T"] == {"name": "T", "kind": "gauge", "unit": "Milliseconds", "value": 4.0}
    assert records["H"] == {
        "name": "H",
        "kind": "histogram",
        "unit": "Milliseconds",
        "value": 5.0,
        "count": 2,
        "dims": [["Stage", "post"]],
    }
    assert "dims" not in records["P"]  # TorchServe's implicit dimensions are the server's "model" label
    assert metrics.drain() == []


def test_metrics_never_fail_the_handler_and_count_what_they_drop():
    metrics = Metrics(max_records=2)
    metrics.add_time("bad", "not a number")
    metrics.add_time("nan", float("nan"))
    metrics.add_counter("negative", -1)
    metrics.add_metric(None, 1)
    for i in range(5):
        metrics.add_counter(f"n{i}", 1)
    metrics.add_counter("n0", 1)  # an existing record still counts
    records = metrics.drain()
    assert [r["name"] for r in records if r["kind"] == "counter"] == ["n0", "n1"]
    assert records[0]["value"] == 2.0
    dropped = {r["reason"]: r["value"] for r in records if r["kind"] == "dropped"}
    assert dropped == {"invalid": 4, "batch_limit": 3}


def test_a_worker_batch_sends_at_most_max_batch_records():
    metrics = Metrics()
    for i in range(MAX_BATCH_RECORDS + 10):
        metrics.add_counter(f"n{i}", 1)
    records = metrics.drain()
    assert len([r for r in records if r["kind"] == "counter"]) == MAX_BATCH_RECORDS
    assert {"kind": "dropped", "reason": "batch_limit", "value": 10} in records


# ---- the server's side: records are the handler's data, checked ------------------------------------
@pytest.fixture
def server_metrics() -> ServerMetrics:
    return ServerMetrics(handler_series_per_model=4)


def rendered(metrics: ServerMetrics) -> str:
    return metrics.render().decode()


def dropped_count(metrics: ServerMetrics, model: str, reason: str) -> float:
    line = f'model_archiver_handler_metrics_dropped_total{{model="{model}",reason="{reason}"}}'
    return sample(rendered(metrics), line)


def test_names_and_dimensions_become_valid_prometheus_names(server_metrics):
    server_metrics.observe_handler_metrics(
        "m",
        [
            {"name": "time.ms-p99 é", "kind": "gauge", "unit": "ms", "value": 3},
            {"name": "hits_total", "kind": "counter", "value": 1},
            {
                "name": "x",
                "kind": "gauge",
                "value": 1,
                "dims": [["9 lives", "a"], ["model", "b"], ["__x", "c"]],
            },
        ],
    )
    text = rendered(server_metrics)
    assert sample(text, 'model_archiver_handler_time_ms_p99__{model="m"}') == 3.0
    assert sample(text, 'model_archiver_handler_hits_total{model="m"}') == 1.0
    assert 'dim_9_lives="a"' in text and 'dim_model="b"' in text and 'dim___x="c"' in text
    for line in text.splitlines():
        if not line.startswith("#"):
            assert re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*[{ ]", line), line


def test_malformed_records_are_counted_not_raised(server_metrics):
    server_metrics.observe_handler_metrics(
        "m",
        [
            "not a dict",
            {"name": "a", "kind": "gauge", "value": "1"},
            {"name": "a", "kind": "gauge", "value": float("inf")},
            {"name": "a", "kind": "gauge", "value": True},
            {"name": "", "kind": "gauge", "value": 1},
            {"name": "a", "kind": "summary", "value": 1},
            {"name": "a", "kind": "counter", "value": -1},
            {"name": "a", "kind": "histogram", "value": 1, "count": "2"},
            {"name": "a", "kind": "gauge", "value": 1, "dims": "Stage"},
            {"name": "a", "kind": "gauge", "value": 1, "dims": [["Stage", 3]]},
            {"kind": "dropped", "reason": "batch_limit", "value": 5},
        ],
    )
    assert dropped_count(server_metrics, "m", "invalid") == 10
    assert dropped_count(server_metrics, "m", "batch_limit") == 5
    assert "model_archiver_handler_a" not in rendered(server_metrics)


def test_a_name_reused_with_another_type_or_dimensions_conflicts(server_metrics):
    server_metrics.observe_handler_metrics(
        "m",
        [
            {"name": "x", "kind": "counter", "value": 1},
            {"name": "x", "kind": "gauge", "value": 1},
            {"name": "x", "kind": "counter", "value": 1, "dims": [["Stage", "a"]]},
            {"name": "x_total", "kind": "gauge", "value": 1},  # would print the counter's sample name
            {"name": "metrics_dropped", "kind": "counter", "value": 1},  # the server's own family
        ],
    )
    text = rendered(server_metrics)
    assert sample(text, 'model_archiver_handler_x_total{model="m"}') == 1.0
    assert dropped_count(server_metrics, "m", "conflict") == 4


def test_the_bound_counts_series_per_model_and_the_records_per_batch(server_metrics):
    names = [{"name": f"n{i}", "kind": "gauge", "value": i} for i in range(6)]
    server_metrics.observe_handler_metrics("m", names)
    server_metrics.observe_handler_metrics("m", [{"name": "n0", "kind": "gauge", "value": 9}])
    server_metrics.observe_handler_metrics(
        "m", [{"name": "n1", "kind": "gauge", "value": 1, "dims": [["a", "b"]]}]
    )
    server_metrics.observe_handler_metrics("other", names[:1])
    text = rendered(server_metrics)
    assert len(series(text, "model_archiver_handler_n")) == 5  # four for "m", one for "other"
    assert sample(text, 'model_archiver_handler_n0{model="m"}') == 9.0
    assert dropped_count(server_metrics, "m", "series_limit") == 2
    assert dropped_count(server_metrics, "m", "conflict") == 1

    flood = [{"name": "n0", "kind": "gauge", "value": 1}] * 300
    server_metrics.observe_handler_metrics("other", flood)
    assert dropped_count(server_metrics, "other", "batch_limit") == 300 - 256
