"""The pytest plugin (archiver.testing), as a user's test suite sees it: a separate pytest run in a
folder of its own, which gets the fixtures from the installed entry point alone."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

# A pure-Python handler (no torch in the test process): echoes each body with the model's name.
ECHO_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [{"got": row.get("body"), "model": context.model_name, "batch": len(data)} for row in data]
"""
BROKEN_HANDLER = """
def handle(data, context):
    raise RuntimeError("boom in initialize")
"""

USER_TESTS = """
import json
import urllib.request
from pathlib import Path

import pytest

from archiver.errors import HandlerError


@pytest.fixture
def handler(tmp_path):
    path = tmp_path / "echo_handler.py"
    path.write_text(ECHO)
    return path


def post_json(url, value):
    request = urllib.request.Request(
        url, data=json.dumps(value).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def get_json(url):
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def test_flags_load_in_process(mar_model, handler, mar_cache_dir):
    model = mar_model(model_name="echo", handler=handler)
    assert model.name == "echo" and model.version == "1.0"
    assert model.predict([{"x": 1}, "text"]) == [
        {"got": {"x": 1}, "model": "echo", "batch": 2},
        {"got": "text", "model": "echo", "batch": 2},
    ]
    assert model.model_dir.parent == mar_cache_dir / "models"


def test_an_archive_path_loads_under_another_name(mar_archive, mar_model, handler, tmp_path):
    archive = mar_archive(model_name="echo", version="2.0", handler=handler, archive_format="no-archive")
    assert archive == tmp_path / "model-store" / "echo" and archive.is_dir()
    model = mar_model(archive, name="renamed")
    assert model.version == "2.0"
    assert model.predict([[1, 2]]) == [{"got": [1, 2], "model": "renamed", "batch": 1}]


def test_path_and_flags_together_are_refused(mar_model, handler):
    with pytest.raises(TypeError, match="archive path or archiver flags"):
        mar_model(Path("x.mar"), model_name="echo")
    with pytest.raises(TypeError):
        mar_model()


def test_a_handler_that_fails_to_initialize_raises(mar_model, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text(BROKEN)
    with pytest.raises(HandlerError, match="boom in initialize"):
        mar_model(model_name="broken", handler=broken)


def test_live_server(mar_archive, mar_server, handler):
    archive = mar_archive(model_name="echo", handler=handler)
    server = mar_server(archive, ("other", archive), workers=2)
    assert server.url() == server.inference_url
    assert server.inference_url.startswith("http://127.0.0.1:")
    assert len({server.inference_url, server.management_url, server.metrics_url}) == 3
    answer = post_json(server.predictions_url("echo"), {"x": 1})
    assert answer == {"got": {"x": 1}, "model": "echo", "batch": 1}
    assert post_json(server.predictions_url("other", "1.0"), "hi")["model"] == "other"
    [described] = get_json(server.management_url + "/models/echo")
    assert described["status"] == "READY" and len(described["workers"]) == 2
    assert set(server.models()) == {"echo", "other"}
    with urllib.request.urlopen(server.metrics_url + "/metrics", timeout=60) as response:
        assert response.status == 200


def test_flags_serve_directly(mar_server, handler):
    server = mar_server({"model_name": "flagged", "handler": handler})
    assert post_json(server.predictions_url("flagged"), [3])["got"] == [3]


def test_a_model_that_fails_to_load_fails_the_test_with_its_reason(mar_server, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text(BROKEN)
    with pytest.raises(pytest.fail.Exception, match="broken/1.0: .*boom in initialize"):
        mar_server({"model_name": "broken", "handler": broken})
    server = mar_server({"model_name": "broken", "handler": broken}, check_loaded=False)
    assert "boom in initialize" in server.failed_models()["broken/1.0"]


def test_unknown_settings_are_refused(mar_server):
    with pytest.raises(TypeError, match="no_such_setting"):
        mar_server(no_such_setting=1)
"""


def user_suite(pytester: pytest.Pytester) -> None:
    source = USER_TESTS.replace("ECHO)", f"{ECHO_HANDLER!r})").replace("BROKEN)", f"{BROKEN_HANDLER!r})")
    pytester.makepyfile(test_user=source)


def test_the_plugin_is_registered_under_pytest11(pytestconfig: pytest.Config):
    entry_points = importlib.metadata.entry_points(group="pytest11")
    assert {ep.name: ep.value for ep in entry_points}.get("model_archiver") == "archiver.testing"
    assert pytestconfig.pluginmanager.has_plugin("model_archiver")
    from archiver.testing import CACHE_ENV as PLUGIN_CACHE_ENV
    from archiver.unpack_cache import CACHE_ENV

    assert PLUGIN_CACHE_ENV == CACHE_ENV


def test_the_fixtures_work_in_a_users_test_suite(pytester: pytest.Pytester, monkeypatch, tmp_path: Path):
    user_suite(pytester)
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("MODEL_ARCHIVER_CACHE", str(cache))  # the plugin uses it instead of a temp folder
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=240)
    result.assert_outcomes(passed=8)
    assert len(list((cache / "models").iterdir())) >= 2


def test_loading_the_plugin_imports_neither_torch_nor_the_server(pytester: pytest.Pytester):
    """pytest loads every pytest11 plugin for every run in the environment: it must stay cheap."""
    pytester.makepyfile(
        test_light=textwrap.dedent(
            """
            import sys


            def test_nothing_heavy_was_imported(request):
                assert request.config.pluginmanager.has_plugin("model_archiver")
                heavy = {
                    "torch", "torchvision", "aiohttp", "archiver.serving.worker.loader", "archiver.build"
                }
                assert not heavy & set(sys.modules)
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)


def test_the_project_defines_no_fixture_of_the_same_name():
    """The project's own conftest files must not shadow the plugin's fixtures."""
    names = ("mar_model", "mar_server", "mar_archive", "mar_cache_dir")
    for conftest in Path(__file__).parent.rglob("conftest.py"):
        text = conftest.read_text()
        assert not [n for n in names if f"def {n}(" in text], conftest
