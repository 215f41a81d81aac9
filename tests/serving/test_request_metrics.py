"""The request counter and latency histogram, kept as plain numbers on the hot path, expose exactly what
prometheus-client's own labelled Counter and Histogram would for the same requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from archiver.serving.front.metrics import _LATENCY_BUCKETS_S, ServerMetrics


def _request_lines(text: str) -> list[str]:
    return sorted(
        line
        for line in text.splitlines()
        if "model_archiver_request" in line and "_created" not in line and not line.startswith("#")
    )


def test_request_metrics_match_prometheus_clients_counter_and_histogram():
    ours = ServerMetrics()
    reference = CollectorRegistry()
    counter = Counter("model_archiver_requests", "x", ["model", "status"], registry=reference)
    histogram = Histogram(
        "model_archiver_request_latency_seconds",
        "x",
        ["model"],
        buckets=_LATENCY_BUCKETS_S,
        registry=reference,
    )
    # Values on bucket bounds (le is inclusive), between them, past the last one and at zero.
    observations = [
        ("echo", 200, 0.001),
        ("echo", 200, 0.0010001),
        ("echo", 400, 0.3),
        ("echo", 200, 0.0),
        ("-", 404, 61.0),
        ("tiny", 200, 60.0),
        ("tiny", 503, 0.0025),
    ]
    for model, status, seconds in observations:
        ours.observe_request(model, status, seconds)
        counter.labels(model, str(status)).inc()
        histogram.labels(model).observe(seconds)

    got = generate_latest(ours.registry).decode()
    assert _request_lines(got) == _request_lines(generate_latest(reference).decode())
    assert 'model_archiver_requests_total{model="echo",status="200"} 3.0' in got
    assert 'model_archiver_request_latency_seconds_bucket{le="0.001",model="echo"} 2.0' in got
    assert 'model_archiver_request_latency_seconds_bucket{le="+Inf",model="-"} 1.0' in got
    # Each series says when it was first seen, as prometheus-client's do.
    assert 'model_archiver_requests_created{model="tiny",status="503"}' in got
    assert 'model_archiver_request_latency_seconds_created{model="tiny"}' in got
    assert "# TYPE model_archiver_request_latency_seconds histogram" in got
