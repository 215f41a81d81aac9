"""A server without a token answers only its own host names and its own origin: a forged ``Host`` (DNS
rebinding) and a request from another web origin get 403 before any route runs, on all three ports;
``--allowed-hosts`` and ``--allowed-origins`` add more; with a token, the token alone decides.

The browser's side of the same attacks (a real page on another origin, in Chromium) is in
tests/browser/test_cross_site_page.py.
"""

from __future__ import annotations

import json

import pytest

from archiver.cli import main
from archiver.commands.serve import build_settings
from archiver.errors import CrossSiteRequestError, UsageError
from archiver.serving.front.site_guard import SiteRules, parse_origin, split_host_port

EVIL = "http://evil.example"


def refused(reply) -> bool:
    """A 403 from the site rules, said as every error is: one JSON line with code, type and message."""
    if reply.status != 403 or not reply.headers.get("Content-Type", "").startswith("application/json"):
        return False
    body = reply.json()
    return body["code"] == 403 and body["type"] == "CrossSiteRequestError" and body["message"]


def model_names(call, server) -> list[str]:
    return [m["modelName"] for m in call("GET", server.url("management") + "/models").json()["models"]]


def test_a_forged_host_is_refused_on_every_port_and_the_servers_own_names_are_answered(
    serve, call, echo_model
):
    server = serve([echo_model])
    ports = server.server.ports
    routes = {
        "inference": "/ping",
        "management": "/models",
        "metrics": "/metrics",
    }
    for which, path in routes.items():
        url = server.url(which) + path
        port = ports[which]
        # A page whose name was rebound to 127.0.0.1 still sends its own name.
        for forged in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "[::2]", "a b", ""):
            assert refused(call("GET", url, headers={"Host": forged})), (which, forged)
        for own in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", f"[::1]:{port}"):
            assert call("GET", url, headers={"Host": own}).status == 200, (which, own)
    # Nothing runs behind a refusal: a prediction sent with a forged Host never reaches the model.
    reply = call("POST", server.url() + "/predictions/echo", b"hi", headers={"Host": "evil.example"})
    assert refused(reply) and "--allowed-hosts" in reply.json()["message"]
    assert call("POST", server.url() + "/predictions/echo", b"hi").json()["echo"] == "hi"


def test_a_request_from_another_origin_acts_on_nothing(serve, call, make_model, tmp_path):
    echo = make_model("echo")
    make_model("victim")
    server = serve([echo], model_store=tmp_path / "models")
    inference, management = server.url(), server.url("management")
    v2 = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]})
    attacks = [
        ("POST", f"{management}/models?url=victim&model_name=stolen&initial_workers=1", None, {}),
        ("PUT", f"{management}/models/echo?min_worker=3", None, {}),
        ("DELETE", f"{management}/models/echo", None, {}),
        ("POST", f"{inference}/predictions/echo", "hi", {}),
        (
            "POST",
            f"{inference}/predictions/echo",
            "data=hi",
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),
        ("POST", f"{inference}/v2/models/echo/infer", v2, {"Content-Type": "application/json"}),
        ("POST", f"{inference}/v1/models/echo:predict", '{"instances": ["a"]}', {}),
        # Reads sent in CORS mode carry an Origin too: refused, though the browser would hide the answer.
        ("GET", f"{management}/models", None, {}),
        ("GET", f"{inference}/page/models", None, {}),
    ]
    origins = [
        EVIL,
        "null",  # a sandboxed frame or a file: page
        f"http://127.0.0.1:{server.server.ports['inference'] + 1}",
        f"https://127.0.0.1:{server.server.ports['inference']}",
        "not an origin",
    ]
    for method, url, body, headers in attacks:
        # Each port is an origin of its own: a page from the other port is another site.
        other_port = inference if url.startswith(management) else management
        for origin in [*origins, other_port]:
            reply = call(method, url, body, headers={**headers, "Origin": origin})
            assert refused(reply), (method, url, origin, reply.status, reply.body[:200])
    # Without an Origin, a browser's Sec-Fetch-Site still says where a request came from.
    for site in ("cross-site", "same-site"):
        reply = call("POST", f"{inference}/predictions/echo", "hi", headers={"Sec-Fetch-Site": site})
        assert refused(reply), site
    assert model_names(call, server) == ["echo"]
    (echo_description,) = call("GET", f"{management}/models/echo").json()
    assert echo_description["minWorkers"] == 1
    metrics = call("GET", server.url("metrics") + "/metrics").body.decode()
    assert 'model_archiver_requests_total{model="echo"' not in metrics  # no request reached the model

    # The server's own origin (the port the request came in on) is answered, by any of its names.
    port = server.server.ports["inference"]
    for origin, host in ((inference, None), (f"http://localhost:{port}", f"localhost:{port}")):
        headers = {"Origin": origin, **({"Host": host} if host else {})}
        assert call("POST", f"{inference}/predictions/echo", "mine", headers=headers).json()["echo"] == "mine"
    # A link or an image from another site (a GET without an Origin) still gets the page.
    page = call(
        "GET", inference + "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    )
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    # A client that is no browser sends neither header and is served as before.
    assert call("POST", f"{management}/models?url=victim&model_name=mine").status == 200
    assert model_names(call, server) == ["echo", "mine"]


def test_on_every_address_a_page_from_another_address_is_not_the_servers_own(
    serve, call, make_model, tmp_path
):
    make_model("victim")
    server = serve(model_store=tmp_path / "models", host="0.0.0.0", no_auth=True)
    port = server.server.ports["management"]
    url = f"http://127.0.0.1:{port}/models?url=victim&model_name=stolen&initial_workers=1"
    # Bound to every address, any address names this server; a page served from another machine's
    # address on the same port number is still another site, whatever address it sends its request to.
    for host, origin in (
        (f"192.0.2.2:{port}", f"http://203.0.113.9:{port}"),
        (f"127.0.0.1:{port}", f"http://192.0.2.2:{port}"),
        (f"127.0.0.1:{port}", f"http://127.0.0.2:{port}"),
        (f"[::1]:{port}", f"http://localhost:{port}"),
    ):
        reply = call("POST", url, headers={"Host": host, "Origin": origin})
        assert refused(reply), (host, origin, reply.status, reply.body[:200])
    assert model_names(call, server) == []
    # The server's own page, by whichever address the browser reached it, is answered.
    own = {"Host": f"192.0.2.2:{port}", "Origin": f"http://192.0.2.2:{port}"}
    assert call("POST", url, headers=own).status == 200
    assert model_names(call, server) == ["stolen"]


def test_a_page_on_another_loopback_address_is_another_site(serve, call, echo_model):
    server = serve([echo_model])
    port = server.server.ports["inference"]
    url = server.url() + "/predictions/echo"
    # 127.0.0.2:PORT can be another program's server (each loopback address has its own ports).
    for origin in (f"http://127.0.0.2:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"):
        assert refused(call("POST", url, "hi", headers={"Origin": origin})), origin
    assert call("POST", url, "hi", headers={"Origin": f"http://127.0.0.1:{port}"}).json()["echo"] == "hi"


def test_two_origin_headers_are_refused_whichever_comes_first(serve, raw, echo_model):
    server = serve([echo_model])
    port = server.server.ports["inference"]
    own, evil = f"http://127.0.0.1:{port}".encode(), EVIL.encode()
    for first, second in ((own, evil), (evil, own), (own, own)):
        answer = raw(
            port,
            b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: %s\r\nOrigin: %s\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
            % (port, first, second),
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"403", (first, second, answer[:300])
        assert json.loads(body)["type"] == "CrossSiteRequestError"


def test_allowed_hosts_and_origins_add_to_the_servers_own(serve, call, echo_model):
    server = serve(
        [echo_model],
        allowed_hosts=["models.internal,gpu-box"],
        allowed_origins=["http://localhost:3000", "https://tools.example/"],
    )
    url = server.url() + "/predictions/echo"
    for host in ("models.internal", "gpu-box:8080", "MODELS.INTERNAL."):
        assert call("POST", url, "hi", headers={"Host": host}).status == 200, host
    assert refused(call("POST", url, "hi", headers={"Host": "other.internal"}))
    for origin in ("http://localhost:3000", "https://tools.example", "https://tools.example:443"):
        assert call("POST", url, "hi", headers={"Origin": origin}).status == 200, origin
    for origin in ("http://localhost:3001", "http://tools.example", EVIL):
        assert refused(call("POST", url, "hi", headers={"Origin": origin})), origin

    anything = serve([echo_model], allowed_hosts=["*"], allowed_origins=["*"])
    headers = {"Host": "evil.example", "Origin": "null", "Sec-Fetch-Site": "cross-site"}
    assert call("POST", anything.url() + "/predictions/echo", "hi", headers=headers).json()["echo"] == "hi"


def test_with_a_token_the_token_alone_decides(serve, call, echo_model):
    server = serve([echo_model], token="s3cret")
    url = server.url() + "/predictions/echo"
    foreign = {"Host": "evil.example", "Origin": EVIL}
    # A browser never adds the Authorization header by itself, so a foreign page cannot send it.
    assert call("POST", url, "hi", headers=foreign).status == 401
    reply = call("POST", url, "hi", headers={**foreign, "Authorization": "Bearer s3cret"})
    assert reply.status == 200 and reply.json()["echo"] == "hi"
    assert call("GET", server.url() + "/ping", headers=foreign).status == 200


def test_the_flags_and_the_config_file_both_set_the_lists(tmp_path, echo_model, capsys):
    config = tmp_path / "serve.yaml"
    config.write_text("allowed-hosts: [models.internal]\nallowed_origins: http://localhost:3000\n")
    from_file = build_settings((str(echo_model),), (), str(config), {})
    assert from_file.allowed_hosts == ["models.internal"]
    assert from_file.allowed_origins == ["http://localhost:3000"]
    flags = {"allowed_hosts": ("a.internal,b.internal",), "allowed_origins": ("http://localhost:4000",)}
    from_flags = build_settings((str(echo_model),), (), str(config), flags)
    assert from_flags.allowed_hosts == ["a.internal,b.internal"]
    assert from_flags.allowed_origins == ["http://localhost:4000"]

    # A malformed entry stops the command before it binds anything: exit 2, one line.
    for flag, value in (("--allowed-origins", "ftp://files.example"), ("--allowed-hosts", "bad/host")):
        with pytest.raises(SystemExit) as exited:
            main(["serve", str(echo_model), flag, value])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and value in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UsageError, match="allowed-origins"):
        build_settings((str(echo_model),), (), None, {"allowed_origins": ("localhost:3000",)})


@pytest.mark.parametrize(
    ("bound", "host", "answered"),
    [
        ("127.0.0.1", "localhost", True),
        ("127.0.0.1", "127.0.0.2", True),  # every loopback address is this machine
        ("127.0.0.1", "[0:0:0:0:0:0:0:1]:80", True),
        ("127.0.0.1", "10.0.0.5", False),
        ("10.0.0.5", "10.0.0.5:8080", True),
        ("10.0.0.5", "10.0.0.6", False),
        ("models.lan", "Models.LAN:8080", True),
        # Bound to every address, any address is this server's; a rebinding always carries a name.
        ("0.0.0.0", "192.168.1.20:8080", True),
        ("::", "[fe80::1]", True),
        ("0.0.0.0", "evil.example", False),
    ],
)
def test_which_host_names_a_server_answers(bound: str, host: str, answered: bool):
    rules = SiteRules.build(bound)
    if answered:
        rules.check("GET", {"Host": host}, 8080)
    else:
        with pytest.raises(CrossSiteRequestError):
            rules.check("GET", {"Host": host}, 8080)


def test_hosts_and_origins_are_read_as_browsers_write_them():
    assert split_host_port("[::1]:8080") == ("::1", 8080)
    assert split_host_port("LocalHost.:80") == ("localhost", 80)
    assert split_host_port("::1") == ("::1", None)
    for junk in ("evil.example:99999", "evil.example:8o", "[::1", "a/b", "user@host", "a:b:c"):
        assert split_host_port(junk) is None, junk
    assert str(parse_origin("HTTP://LOCALHOST")) == "http://localhost:80"
    assert str(parse_origin("https://[::1]")) == "https://[::1]:443"
    for junk in ("null", "localhost:3000", "file://", "http://", "http://a/b/c"):
        assert parse_origin(junk) is None, junk
    # A port-forwarded page (Host localhost:9000 reaching port 8080) is the server's own too.
    rules = SiteRules.build("127.0.0.1")
    rules.check("POST", {"Host": "localhost:9000", "Origin": "http://localhost:9000"}, 8080)
    with pytest.raises(CrossSiteRequestError):
        rules.check("POST", {"Host": "localhost:8080", "Origin": "http://localhost:9000"}, 8080)
