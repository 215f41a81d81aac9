"""A streaming handler on a real local Ray Serve: its answers reach the client chunk by chunk, through the
model's own deployment (the application's ingress) and through the multi-model router, and a client that
leaves cancels the handler there as on the bundled server."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

STORY_HANDLER = """
import pathlib
import time

from ts.handler_utils.utils import send_intermediate_predict_response

MARK = pathlib.Path({mark!r})


def handle(data, context):
    if data is None:
        return None
    body = data[0].get("body")
    body = body.decode() if isinstance(body, (bytes, bytearray)) else body
    if body == "long":
        try:
            for i in range(600):
                tick = [f"tick {{i}}\\n"]
                send_intermediate_predict_response(tick, context.request_ids, "tick", 200, context)
                time.sleep(0.05)
        except Exception as exc:
            MARK.write_text(type(exc).__name__)
            raise
        return ["done"]
    for word in ("once ", "upon ", "a "):
        send_intermediate_predict_response([word], context.request_ids, "more", 200, context)
        time.sleep(0.3)
    return ["time"]
"""


def folder_archive(root: Path, name: str, handler: str) -> Path:
    folder = root / name
    (folder / "MAR-INF").mkdir(parents=True)
    (folder / "handler.py").write_text(textwrap.dedent(handler))
    model = {"modelName": name, "handler": "handler.py", "modelVersion": "1.0"}
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"runtime": "python", "model": model}))
    return folder


@pytest.fixture(scope="module")
def ray_streams(tmp_path_factory, kit):
    """Ray running the story model alone (``/solo``: its deployment is the ingress) and beside an echo
    model (``/duo``: behind the router); ``mark`` is where the handler writes how a cancelled send ended."""
    tmp = tmp_path_factory.mktemp("ray-streams")
    mark = tmp / "cancelled"
    story = folder_archive(tmp / "models", "story", STORY_HANDLER.format(mark=str(mark)))
    echo = kit.write_echo(tmp / "echo-models", "1.0")
    app = "archiver.integrations.ray_serve:build_app"
    # a quarter of a CPU each: three replicas on a two-core machine
    small = [{"name": n, "ray_actor_options": {"num_cpus": 0.25}} for n in ("story", "echo")]
    applications = [
        {"name": name, "route_prefix": f"/{name}", "import_path": app, "args": {"archives": archives}}
        | {"deployments": small[: len(archives)]}
        for name, archives in (("solo", [str(story)]), ("duo", [str(story), str(echo)]))
    ]
    engine = kit.start_ray(tmp, {"applications": applications}, timeout_s=600)
    yield engine, mark
    engine.stop()


def timed_chunks(url: str, body: str) -> tuple[requests.Response, list[tuple[float, bytes]]]:
    started = time.perf_counter()
    response = requests.post(url, data=body, stream=True, timeout=60)
    chunks = [(time.perf_counter() - started, c) for c in response.iter_content(chunk_size=None) if c]
    return response, chunks


@pytest.mark.parametrize("app", ["solo", "duo"])
def test_a_streaming_handler_streams_through_ray_serve(ray_streams, app):
    engine, _ = ray_streams
    response, chunks = timed_chunks(f"{engine.url}/{app}/predictions/story", "tell")
    assert response.status_code == 200
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert b"".join(c for _, c in chunks) == b"once upon a time"
    first = next(t for t, c in chunks if c)
    assert chunks[-1][0] - first > 0.7, chunks  # the first chunk came when it was made, not at the end


def test_a_plain_model_beside_it_answers_whole(ray_streams, kit):
    engine, _ = ray_streams
    response = requests.post(f"{engine.url}/duo/predictions/echo", data="hi", timeout=60)
    assert response.status_code == 200 and "Transfer-Encoding" not in response.headers
    assert response.headers["Content-Length"] == str(len(response.content))


def test_a_client_that_leaves_cancels_the_handler_on_ray(ray_streams, kit):
    engine, mark = ray_streams
    response = requests.post(f"{engine.url}/solo/predictions/story", data="long", stream=True, timeout=60)
    ticks = response.iter_content(chunk_size=None)
    assert next(ticks).startswith(b"tick")
    response.close()
    deadline = time.monotonic() + 30
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mark.exists() and mark.read_text() == "StreamCancelledError"
    again = requests.post(f"{engine.url}/solo/predictions/story", data="tell", timeout=60)
    assert again.text == "once upon a time"


def test_on_kserve_a_streaming_handler_answers_whole(tmp_path: Path, kit):
    """KServe 0.21's v1 and v2 routes send one answer (docs/streaming.md says why): its last."""
    story = folder_archive(tmp_path / "models", "story", STORY_HANDLER.format(mark=str(tmp_path / "unused")))
    engine = kit.start_kserve(tmp_path, story)
    try:
        body = {"instances": [{"body": "tell"}]}
        reply = requests.post(f"{engine.url}/v1/models/story:predict", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json() == {"predictions": ["time"]}
    finally:
        engine.stop()
