"""Context: TorchServe's names for the model's properties and each request's headers, status and type."""

from __future__ import annotations

import pytest

from handlers import Context


@pytest.fixture
def context(tmp_path):
    ctx = Context(
        "resnet34",
        str(tmp_path),
        {"model": {"modelName": "resnet34"}},
        8,
        None,
        "0.1.0",
        model_yaml_config={"handler": {"topk": 3}},
    )
    ctx.begin_batch(["a", "b"], [{"Content-Type": "image/jpeg", "X-Trace": "1"}, {"accept": "image/png"}])
    return ctx


def test_system_properties_have_torchserves_keys(context, tmp_path):
    assert context.system_properties == {
        "model_dir": str(tmp_path),
        "gpu_id": None,
        "batch_size": 8,
        "server_name": "model-archiver",
        "server_version": "0.1.0",
        "limit_max_image_pixels": True,
    }
    assert context.model_name == "resnet34"
    assert context.manifest["model"]["modelName"] == "resnet34"
    assert context.model_yaml_config == {"handler": {"topk": 3}}


def test_request_headers_are_found_in_any_case(context):
    assert context.get_request_header(0, "Content-Type") == "image/jpeg"
    assert context.get_request_header(0, "content-type") == "image/jpeg"  # TorchServe: None
    assert context.get_request_header(1, "Accept") == "image/png"
    assert context.get_request_header(1, "X-Trace") is None
    assert context.get_all_request_header(0) == {"Content-Type": "image/jpeg", "X-Trace": "1"}
    assert [context.get_request_id(0), context.get_request_id(1)] == ["a", "b"]


def test_status_content_type_and_headers_are_per_request_and_reset_each_batch(context):
    context.set_response_status(404, "no such thing", 1)
    context.set_response_content_type(0, "image/png")
    context.set_response_header(0, "X-Mask", "yes")

    assert context.get_response_status(0) == (200, "")
    assert context.get_response_status(1) == (404, "no such thing")
    assert context.get_response_content_type(0) == "image/png"
    assert context.get_response_headers(0) == {"X-Mask": "yes"}

    context.begin_batch(["c"], [{}])
    assert context.get_response_status(0) == (200, "")
    assert context.get_response_content_type(0) is None
    with pytest.raises(IndexError):
        context.set_response_status(500, "", 3)


def test_metrics_calls_from_torchserve_handlers_are_recorded(context):
    context.metrics.add_time("PreprocessTime", 12.5, None, "ms")
    context.metrics.add_counter("Images", 2)
    context.metrics.add_counter("Images", 3)

    # TorchServe 0.12's metric_abstract reports a short unit by its long name (ts/metrics/unit.py)
    assert context.metrics.values["PreprocessTime"] == (12.5, "Milliseconds")
    assert context.metrics.values["Images"] == (5.0, "Count")
