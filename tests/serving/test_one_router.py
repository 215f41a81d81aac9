"""One route table for every host (issue 20, step 2): the bundled server's aiohttp app and the engine
hosts' adapter (Ray, KServe) answer the same routes, through the same router, alike.

A user who moves a model from ``model-archiver serve`` to Ray Serve sends the same requests and reads
the same answers: every route the router defines is registered on the aiohttp app and answered by the
adapter with the same status and body, the v2 server metadata lists the same extensions, and request
ids are made by one rule."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from archiver.integrations.routes import ModelRoute, ModelTable, dispatch
from archiver.serving.front.app import inference_app
from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.protocols import router
from archiver.serving.protocols.wire import to_inference_request
from archiver.serving.worker.loader import load_model

JSON = {"Content-Type": "application/json"}
HEX_ID = re.compile(r"[0-9a-f]{32}")
# A body each POST/PUT route can use on the echo model.
BODIES = {
    router.predictions: (b"hi", {"Content-Type": "text/plain"}),
    router.explanations: (b"why", {"Content-Type": "text/plain"}),
    router.infer: (
        json.dumps(
            {"id": "q", "inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
        ).encode(),
        JSON,
    ),
    router.v1_predict: (json.dumps({"instances": ["a", "b"]}).encode(), JSON),
    router.v1_explain: (json.dumps({"instances": ["a"]}).encode(), JSON),
}


def plain(path: str) -> str:
    """A route's path without its parameters' patterns (``{model:[^/:]+}`` → ``{model}``), as aiohttp
    shows it."""
    return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", path)


def concrete(route: router.Route, version: str) -> str:
    return plain(route.path).replace("{model}", "echo").replace("{version}", version)


@pytest.fixture
def hosts(serve, echo_model, tmp_path):
    """(the bundled server, the adapter's call) over the same echo archive."""
    server = serve([echo_model])
    model = load_model(echo_model, cache_dir=tmp_path / "adapter-cache")

    async def infer(raw):
        return model.handle([to_inference_request(raw)])[0]

    table = ModelTable([ModelRoute(model.name, model.version, infer, str(echo_model))])

    def adapter(method, path, body=b"", headers=None):
        return asyncio.run(dispatch(table, method, path, dict(headers or {}), body, 6553500))

    return server, adapter, model.version


def test_every_route_of_the_router_is_registered_on_the_aiohttp_app_and_no_other(serve):
    server = serve([])
    app = inference_app(server.server.registry, server.server.metrics, HttpLimits())
    registered = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    defined = {(route.method, plain(route.path)) for route in router.ROUTES}
    assert defined <= registered
    namespaces = ("/ping", "/predictions", "/explanations", "/v1/", "/v2")
    served_by_router = {(m, p) for m, p in registered if p.startswith(namespaces)}
    assert served_by_router == defined  # no inference route outside the one table


def test_both_hosts_answer_every_route_alike(hosts, call):
    server, adapter, version = hosts
    for route in router.ROUTES:
        path = concrete(route, version)
        body, headers = BODIES.get(route.operation, (None, {}))
        headers = {**headers, "x-request-id": "story-1"}
        bundled = call(route.method, server.url() + path, body, headers)
        status, answer_headers, answer = adapter(route.method, path, body or b"", headers)
        assert (bundled.status, bundled.body) == (status, answer), (route.method, path)
        assert bundled.status == 200, (route.method, path, bundled.body)
        if route.operation in BODIES:  # the request's id comes back, on both
            assert bundled.headers["x-request-id"] == answer_headers["x-request-id"] == "story-1"


def test_the_v2_server_metadata_is_the_same_on_both_hosts(hosts, call):
    server, adapter, _ = hosts
    bundled = call("GET", server.url() + "/v2").json()
    _, _, answer = adapter("GET", "/v2")
    assert bundled == json.loads(answer)
    assert bundled["extensions"] == ["binary_tensor_data", "model_repository_health", "kserve_v1"]


def test_request_ids_are_made_by_one_rule_on_both_hosts(hosts, call):
    server, adapter, _ = hosts
    for operation, path in (
        (router.predictions, "/predictions/echo"),
        (router.infer, "/v2/models/echo/infer"),
        (router.v1_predict, "/v1/models/echo:predict"),
    ):
        body, headers = BODIES[operation]
        bundled = call("POST", server.url() + path, body, headers)
        _, answer_headers, _ = adapter("POST", path, body, headers)
        assert HEX_ID.fullmatch(bundled.headers["x-request-id"]), path
        assert HEX_ID.fullmatch(answer_headers["x-request-id"]), path
        # an unknown model is a 404 that still names the request it answers, on both
        missing = path.replace("echo", "nope")
        bundled = call("POST", server.url() + missing, body, {**headers, "x-request-id": "lost-1"})
        status, answer_headers, _ = adapter("POST", missing, body, {**headers, "x-request-id": "lost-1"})
        assert bundled.status == status == 404
        assert bundled.headers["x-request-id"] == answer_headers["x-request-id"] == "lost-1"
