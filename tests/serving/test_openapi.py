"""The API described as OpenAPI 3: valid, handed out on both ports, and true to the routes the server
registers: every route is in the document, nothing else is, and its token claims hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

from openapi_spec_validator import validate
from swagger_ui_bundle import swagger_ui_path

from archiver.serving.front.openapi import openapi_document

TOKEN = "s3cret-token"


def registered_routes(thread) -> set[tuple[str, str, str]]:
    """(port, METHOD, path) for every route of every app the running server serves."""
    port_names = {port: name for name, port in thread.server.ports.items()}
    routes = set()
    for runner in thread.server._runners:
        (address,) = {a[1] for a in runner.addresses}
        for route in runner.app.router.routes():
            routes.add((port_names[address], route.method, route.resource.canonical))
    # aiohttp answers HEAD on every GET route by itself; the document describes the GETs.
    heads = {(p, path) for p, m, path in routes if m == "HEAD"}
    assert heads <= {(p, path) for p, m, path in routes if m == "GET"}
    return {r for r in routes if r[1] != "HEAD"}


def described_routes(document: dict) -> set[tuple[str, str, str]]:
    return {
        (port, method.upper(), path)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        for port in operation["x-ports"]
    }


def test_the_document_is_valid_openapi_on_both_ports(serve, echo_model, call) -> None:
    thread = serve([echo_model])
    documents = []
    for which in ("inference", "management"):
        base = thread.url(which)
        for method, path in (("GET", "/openapi.json"), ("OPTIONS", "/"), ("GET", "/api-description")):
            reply = call(method, base + path)
            assert reply.status == 200, (which, path, reply.body)
            assert reply.headers["Content-Type"].startswith("application/json")
            document = reply.json()
            validate(document)
            documents.append((which, document))
    assert documents[0][1]["openapi"].startswith("3.")
    # The ports hand out the same operations; only where each sends "try it out" differs.
    first = described_routes(documents[0][1])
    assert all(described_routes(d) == first for _, d in documents)


def test_every_route_the_server_registers_is_described_and_nothing_else(serve, echo_model) -> None:
    thread = serve([echo_model])
    registered = registered_routes(thread)
    described = described_routes(openapi_document())
    assert registered - described == set(), "routes missing from the OpenAPI document"
    assert described - registered == set(), "the document describes routes the server does not have"
    assert {"inference", "management", "metrics"} == {port for port, _, _ in registered}


def test_other_ports_operations_point_at_their_port(serve, call) -> None:
    thread = serve()
    inference = call("GET", thread.url() + "/openapi.json").json()
    management = call("GET", thread.url("management") + "/openapi.json").json()
    # Same-port operations go to the document's own origin; the others name their port and host.
    assert inference["servers"] == [{"url": "/", "description": "this inference port"}]
    assert "servers" not in inference["paths"]["/predictions/{model}"]["post"]
    (elsewhere,) = inference["paths"]["/models"]["post"]["servers"]
    assert elsewhere["variables"]["port"]["default"] == "8081"
    assert elsewhere["variables"]["host"]["default"] == "127.0.0.1"
    (metrics,) = management["paths"]["/metrics"]["get"]["servers"]
    assert metrics["variables"]["port"]["default"] == "8082"
    assert management["paths"]["/predictions/{model}"]["post"]["servers"][0]["variables"]["port"][
        "default"
    ] == ("8080")
    assert "servers" not in management["paths"]["/models"]["post"]


def _concrete(path: str, document: dict, method: str) -> str:
    """The path with each parameter filled in (an enum's first value, else a plain word)."""
    params = {p["name"]: p for p in document["paths"][path][method].get("parameters", [])}

    def value(match: re.Match) -> str:
        schema = params[match.group(1)]["schema"]
        return schema.get("enum", ["echo" if match.group(1) == "model" else "1.0"])[0]

    return re.sub(r"\{(\w+)\}", value, path)


def test_the_token_is_asked_exactly_where_the_document_says(serve, echo_model, call) -> None:
    thread = serve([echo_model], token=TOKEN)
    document = openapi_document()
    open_ops, guarded = 0, 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for port in operation["x-ports"]:
                url = thread.url(port) + _concrete(path, document, method)
                reply = call(method.upper(), url, body=b"" if method in ("post", "put") else None)
                if operation.get("security") == []:
                    open_ops += 1
                    assert reply.status != 401, f"{method} {path} on {port} asked for the token"
                else:
                    guarded += 1
                    assert reply.status == 401, f"{method} {path} on {port} answered {reply.status}"
                    assert reply.json()["type"] == "UnauthorizedError"
    assert open_ops >= 10 and guarded >= 20
    # With the token, the guarded page listing answers.
    listing = call("GET", thread.url() + "/page/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert listing.status == 200 and listing.json()["models"][0]["name"] == "echo"


def test_docs_serve_swagger_ui_from_the_installed_package(serve, call) -> None:
    thread = serve()
    for which in ("inference", "management"):
        base = thread.url(which)
        page = call("GET", base + "/docs")
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        # Every script and stylesheet it names is served here, from the package's own files.
        assets = re.findall(rb'(?:src|href)="(/docs/[^"]+)"', page.body)
        assert len(assets) == 3
        for asset in assets:
            assert call("GET", base + asset.decode()).status == 200
        bundle = call("GET", base + "/docs/swagger-ui-bundle.js")
        assert bundle.body == (Path(str(swagger_ui_path)) / "swagger-ui-bundle.js").read_bytes()
        assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
        script = call("GET", base + "/docs/docs.js").body.decode()
        assert "validatorUrl: null" in script and 'url: "/openapi.json"' in script
        for missing in ("/docs/swagger-ui.js.map", "/docs/..%2F..%2Fapp.py", "/docs/index.html"):
            reply = call("GET", base + missing)
            assert reply.status == 404 and json.loads(reply.body)["type"] == "ResourceNotFound"


def test_the_documents_host_is_the_callers_when_it_is_a_plain_name(serve, call) -> None:
    # With a token, any Host is answered (without one, only the server's own: test_cross_site.py),
    # and /openapi.json needs no token.
    thread = serve(token="secret")
    url = thread.url("management") + "/openapi.json"
    for sent, written in (
        ("localhost:9999", "localhost"),
        ("[::1]:8081", "[::1]"),
        ("models.example.org", "models.example.org"),
        ('evil"><script>x</script>:1', "127.0.0.1"),
    ):
        document = call("GET", url, headers={"Host": sent}).json()
        (server,) = document["paths"]["/predictions/{model}"]["post"]["servers"]
        assert server["variables"]["host"]["default"] == written, sent
