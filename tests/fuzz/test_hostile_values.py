"""Values beyond the OpenAPI document, sent as raw bytes to a live server: every numeric parameter of the
register and scale APIs with negative, huge and non-finite values, bodies nested 100,000 deep or with
300,000 items, NaN in JSON, malformed multipart and chunked bodies, CR/LF and NUL in headers, oversized
headers, a forged Host and a foreign Origin. Each must be refused with a 4xx JSON error (403 for the
cross-site ones), never a 5xx or a dropped connection, with no worker death and /ping answering.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

HUGE = ("1000000", "1099511627776", "9" * 400)
NON_FINITE = ("nan", "NaN", "inf", "-inf", "Infinity", "1e309")
NEGATIVE = ("-1", "-3")
REFUSED = (*NEGATIVE, *NON_FINITE, *HUGE)  # never a valid worker count, size, delay, timeout or limit
ODD = ("0", "", "x", "0x10", " 1", "1\n", "1_0", "\u0661", "1e-320", "%00", "1.5")  # any 4xx or a 200
REGISTER_NUMBERS = (
    "initial_workers",
    "batch_size",
    "max_batch_delay",
    "response_timeout",
    "worker_memory_limit",
)
DEEP_LIST = b"[" * 100_000 + b"]" * 100_000
DEEP_DICT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
FOREIGN_ORIGIN, FOREIGN_HOST = "http://evil.example", "evil.example"
FOUR_XX = tuple(range(400, 500))
ANY = (200, *FOUR_XX)  # a value some models may take: a 200 or a refusal, never a 5xx


@dataclass
class Attack:
    """One request as raw bytes, and the statuses it may get (any 4xx unless said otherwise)."""

    label: str
    port: str
    method: str
    target: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    expect: tuple[int, ...] = FOUR_XX
    raw_head: bytes | None = None  # sent as the whole head instead of one made from the fields above
    undo: tuple[str, str] | None = None  # (method, target) that takes back what a 2xx did

    def wire(self, port: int) -> bytes:
        if self.raw_head is not None:
            return self.raw_head + self.body
        names = {name.lower() for name, _ in self.headers}
        lines = [f"{self.method} {self.target} HTTP/1.1"]
        if "host" not in names:
            lines.append(f"Host: 127.0.0.1:{port}")
        lines += [f"{name}: {value}" for name, value in self.headers]
        if "content-length" not in names and "transfer-encoding" not in names:
            lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def exchange(port: int, data: bytes, timeout: float = 20.0) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; (status, headers, body), status None if no answer."""
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            # The server may answer early (413) and close before the body was all sent.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
    except ConnectionResetError:
        pass
    except OSError as exc:
        return None, {}, f"{type(exc).__name__}: {exc} after {len(received)} bytes".encode()
    head, sep, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ")
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        return None, {}, b"connection closed with: " + received[:200]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().title()] = value.strip()
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = _unchunk(body)
    return int(parts[1]), headers, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def run_attacks(server: Any, watch: Any, attacks: list[Attack]) -> list[tuple[Attack, int | None, bytes]]:
    """Send each attack in turn; judge each answer (the watch's rules, then the attack's own statuses)."""
    ports = {
        name: int(getattr(server, name).rsplit(":", 1)[1]) for name in ("inference", "management", "metrics")
    }
    answers = []
    for attack in attacks:
        if watch.server_stuck:
            break
        status, headers, body = exchange(ports[attack.port], attack.wire(ports[attack.port]))
        what = f"{attack.label}: {attack.method} {attack.target[:120]} ({len(attack.body)} bytes body)"
        watch.judge(f"{attack.method} {attack.target.split('?')[0]}", what, status, headers, body)
        if status is not None and status < 500 and status not in attack.expect:
            watch.unexpected(what, status, body)
        if status is not None and status < 300 and attack.undo is not None:
            port = ports[attack.port]
            exchange(port, Attack("undo", attack.port, *attack.undo).wire(port))
        answers.append((attack, status, body))
    return answers


def _mgmt(label: str, method: str, target: str, expect=FOUR_XX, undo=None, body=b"", ctype=None) -> Attack:
    headers = (("Content-Type", ctype),) if ctype else ()
    return Attack(label, "management", method, target, body, headers, expect=expect, undo=undo)


def _infer(label: str, target: str, body: bytes, ctype: str, expect=FOUR_XX) -> Attack:
    return Attack(label, "inference", "POST", target, body, (("Content-Type", ctype),), expect=expect)


def parameter_attacks() -> list[Attack]:
    """The register, scale and list APIs' parameters, each with every hostile value; model names, urls."""
    attacks, either = [], (200, *FOUR_XX)
    values = (*REFUSED, *ODD)
    for n, (param, value) in enumerate((p, v) for p in REGISTER_NUMBERS for v in values):
        refused = value in REFUSED and (param, value) != ("worker_memory_limit", "1000000")  # 1 TB is valid
        target = "/models?" + urlencode({"url": "spare", "model_name": f"fz{n}", param: value})
        undo = ("DELETE", f"/models/fz{n}")
        attacks.append(
            _mgmt(f"register {param}={value!r}", "POST", target, (400,) if refused else either, undo)
        )
    for param, value in ((p, v) for p in ("min_worker", "max_worker") for v in values):
        query = {"min_worker": "1", param: value}
        undo = ("PUT", "/models/spare?min_worker=1&max_worker=1")
        expect = (400,) if value in REFUSED else either
        attacks.append(
            _mgmt(f"scale {param}={value!r}", "PUT", "/models/spare?" + urlencode(query), expect, undo)
        )
    for param, value in ((p, v) for p in ("limit", "next_page_token") for v in values):
        attacks.append(
            _mgmt(f"list {param}={value!r}", "GET", "/models?" + urlencode({param: value}), either)
        )
    for name in ("a\n", "a\r\nb", "../../x", "x" * 300, "", "a b", "\u00e9", "a\x00", ".hidden", "a/b"):
        target = "/models?" + urlencode({"url": "spare", "model_name": name})
        expect = either if name == "x" * 300 else FOUR_XX  # a name has no length limit
        undo = ("DELETE", "/models/" + quote(name, safe=""))
        attacks.append(_mgmt(f"register model_name={name[:20]!r}", "POST", target, expect, undo))
    for url in (
        "x" * 300,
        "../spare",
        "/etc/passwd",
        "spare\x00",
        "spare/",
        "%2e%2e",
        "http://evil.example/a",
    ):
        target = "/models?" + urlencode({"url": url, "model_name": "fzurl"})
        attacks.append(_mgmt(f"register url={url[:20]!r}", "POST", target, undo=("DELETE", "/models/fzurl")))
    bodies = {
        "nested 100,000 deep": DEEP_LIST,
        "an object nested 100,000 deep": DEEP_DICT,
        "NaN workers": b'{"url": "spare", "model_name": "fzj", "initial_workers": NaN}',
        "a 1e400 timeout": b'{"url": "spare", "model_name": "fzj", "response_timeout": 1e400}',
        "url as a list": b'{"url": ["spare"]}',
        "url as an object": b'{"url": {"a": 1}}',
        "not UTF-8": b'{"url": "\xff\xfe"}',
    }
    for label, body in bodies.items():
        undo = ("DELETE", "/models/fzj")
        attacks.append(
            _mgmt(f"register body {label}", "POST", "/models", undo=undo, body=body, ctype="application/json")
        )
    return attacks


def _multipart(parts: list[tuple[str, str, bytes]], boundary: str = "fuzzb0und") -> tuple[bytes, str]:
    body = b""
    for name, content_type, value in parts:
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'.encode()
        body += f"Content-Type: {content_type}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _v2(**tensor: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "input-0", **tensor}]}).encode()


def body_attacks() -> list[Attack]:
    """Bodies for /predictions, v1 and v2 on both models: deep, huge, NaN, malformed, mistyped."""
    boundary_type = "multipart/form-data; boundary=fuzzb0und"
    broken = (
        b'--fuzzb0und\r\nContent-Disposition: form-data; name="\xf1\x15 b:T"\r\n\r\nx\r\n--fuzzb0und--\r\n'
    )
    predictions = {
        "a list nested 100,000 deep": (DEEP_LIST, "application/json"),
        "an object nested 100,000 deep": (DEEP_DICT, "application/json"),
        "a multipart part nested 100,000 deep": _multipart([("data", "application/json", DEEP_LIST)]),
        "10,000 multipart fields": _multipart([("data", "text/plain", b"x")] * 10_000),
        "a multipart part header not UTF-8": (broken, boundary_type),
        "multipart with no closing boundary": (b"--fuzzb0und\r\n\r\nx", boundary_type),
        "100,000 url-encoded fields": (b"&".join([b"a=1"] * 100_000), "application/x-www-form-urlencoded"),
        "an unclosed 300 KB JSON list": (b"[" * 300_000, "application/json"),
    }
    v1 = {  # label -> (body, what the echo model may answer, what the float model may answer)
        "300,000 instances": (b'{"instances": [' + b",".join([b"0"] * 300_000) + b"]}", FOUR_XX, FOUR_XX),
        "instances nested 100,000 deep": (b'{"instances": ' + DEEP_LIST + b"}", FOUR_XX, FOUR_XX),
        "NaN and Infinity": (b'{"instances": [[NaN, Infinity, -Infinity, 1e400]]}', ANY, ANY),
        "instances as an object": (b'{"instances": {"a": 1}}', FOUR_XX, FOUR_XX),
        "text for a float model": (b'{"instances": [["a", "b", "c", "d"]]}', ANY, FOUR_XX),
        # The "floats written as integers": JSON writers drop ".0"; the model's dtype decides.
        "integers for a float model": (b'{"instances": [[1, 2, 3, 4]]}', (200,), (200,)),
    }
    v2 = {
        "a shape of 2**40 elements": (_v2(shape=[2**40], datatype="FP32", data=[1]), FOUR_XX, FOUR_XX),
        "a negative shape": (_v2(shape=[-1, 4], datatype="FP32", data=[1, 2, 3, 4]), FOUR_XX, FOUR_XX),
        "a shape of 2**63": (_v2(shape=[2**63], datatype="FP32", data=[1]), FOUR_XX, FOUR_XX),
        "an unknown datatype": (_v2(shape=[1, 4], datatype="FP8", data=[1, 2, 3, 4]), FOUR_XX, FOUR_XX),
        "text for a float model": (_v2(shape=[1, 4], datatype="BYTES", data=list("abcd")), ANY, FOUR_XX),
        "integers for a float model": (_v2(shape=[1, 4], datatype="INT64", data=[1, 2, 3, 4]), ANY, (200,)),
        "null and objects as FP32": (
            _v2(shape=[1, 4], datatype="FP32", data=["NaN", 1, None, {}]),
            FOUR_XX,
            FOUR_XX,
        ),
        "5,000 inputs": (
            json.dumps(
                {
                    "inputs": [
                        {"name": f"i{n}", "shape": [1], "datatype": "FP32", "data": [1]} for n in range(5000)
                    ]
                }
            ).encode(),
            FOUR_XX,
            FOUR_XX,
        ),
        "data nested 100,000 deep": (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + DEEP_LIST + b"}]}",
            FOUR_XX,
            FOUR_XX,
        ),
    }
    attacks = []
    for n, model in enumerate(("echo", "linear")):
        for label, (body, ctype) in predictions.items():
            attacks.append(_infer(f"{model}: {label}", f"/predictions/{model}", body, ctype))
        for label, (body, *expect) in v1.items():
            attacks.append(
                _infer(
                    f"{model} v1: {label}", f"/v1/models/{model}:predict", body, "application/json", expect[n]
                )
            )
        for label, (body, *expect) in v2.items():
            attacks.append(
                _infer(
                    f"{model} v2: {label}", f"/v2/models/{model}/infer", body, "application/json", expect[n]
                )
            )
        for length in ("-1", "99999999999999999999", "x"):
            headers = (
                ("Content-Type", "application/octet-stream"),
                ("Inference-Header-Content-Length", length),
            )
            label = f"{model} v2: Inference-Header-Content-Length {length}"
            attacks.append(
                Attack(label, "inference", "POST", f"/v2/models/{model}/infer", b'{"inputs": []}', headers)
            )
    return attacks


def header_attacks(ports: dict[str, int]) -> list[Attack]:
    """On routes of both ports: cross-site requests (403), then malformed HTTP (a 4xx JSON refusal)."""
    routes = [
        ("inference", "GET", "/ping"),
        ("inference", "POST", "/predictions/echo"),
        ("inference", "POST", "/v2/models/linear/infer"),
        ("management", "GET", "/models"),
        ("management", "POST", "/models?url=spare&model_name=evil"),
        ("management", "PUT", "/models/spare?min_worker=2"),
        ("management", "DELETE", "/models/spare"),
    ]
    attacks = []
    for port, method, target in routes:
        here, other = f"127.0.0.1:{ports[port]}", ports["management" if port == "inference" else "inference"]
        cross_site = {
            "a foreign Origin": (("Origin", FOREIGN_ORIGIN),),
            "Origin null": (("Origin", "null"),),
            "the other port's Origin": (("Origin", f"http://127.0.0.1:{other}"),),
            "its own Origin, then a foreign one": (("Origin", f"http://{here}"), ("Origin", FOREIGN_ORIGIN)),
            "a forged Host": (("Host", FOREIGN_HOST),),
            "a DNS-rebinding Host": (("Host", f"{FOREIGN_HOST}:{ports[port]}"),),
        }
        if method != "GET":
            cross_site["Sec-Fetch-Site: cross-site"] = (("Sec-Fetch-Site", "cross-site"),)
        for label, headers in cross_site.items():
            body = b"x" if method == "POST" else b""
            attacks.append(Attack(label, port, method, target, body, headers, (403,)))
        line = f"{method} {target} HTTP/1.1\r\nHost: {here}\r\n".encode()
        long_line = f"{method} {target}?{'a' * 100_000} HTTP/1.1\r\nHost: {here}\r\n".encode()
        close = b"Connection: close\r\n\r\n"
        end, chunked = b"Content-Length: 0\r\n" + close, b"Transfer-Encoding: chunked\r\n" + close
        malformed = {
            "a bare LF inside a header": line + b"X-A: a\nX-B: b\r\n" + end,
            "a CR inside a header value": line + b"X-A: a\rb\r\n" + end,
            "a NUL inside a header value": line + b"X-A: a\x00b\r\n" + end,
            "a space in a header name": line + b"X A: a\r\n" + end,
            "an obsolete folded header": line + b"X-A: a\r\n b\r\n" + end,
            "a 100 KB header": line + b"X-A: " + b"a" * 100_000 + b"\r\n" + end,
            "a 100 KB request line": long_line + end,
            "a negative Content-Length": line + b"Content-Length: -1\r\n" + close,
            "a 20-digit Content-Length": line + b"Content-Length: 99999999999999999999\r\n" + close,
            "Content-Length and chunked": line + b"Content-Length: 3\r\n" + chunked + b"0\r\n\r\n",
            "a chunk size that is not hex": line + chunked + b"zz\r\nx\r\n0\r\n\r\n",
            "a 2**64 chunk size": line + chunked + b"ffffffffffffffffff\r\nx\r\n0\r\n\r\n",
            "HTTP/9.9": f"{method} {target} HTTP/9.9\r\nHost: {here}\r\n".encode() + end,
        }
        attacks += [Attack(label, port, method, target, raw_head=raw) for label, raw in malformed.items()]
    # The front's own header to its workers: a client's is dropped, the request served as plain text.
    internal = (("x-archiver-protocol", "v2"), ("Content-Type", "text/plain"))
    label = "a client's x-archiver-protocol header"
    attacks.append(Attack(label, "inference", "POST", "/predictions/echo", b"hi", internal, expect=(200,)))
    return attacks


def _finish(watch: Any, title: str, started: float, sent: int, planned: int) -> None:
    workers = watch.worker_problems()
    print("\n" + watch.summary(title, time.perf_counter() - started))
    for line in [*workers, *watch.ping_slow[:10], *watch.report()]:
        print("  " + line)
    assert sent == planned, f"{planned - sent} attacks never sent: the server stopped answering /ping"
    assert not workers, workers
    assert not watch.ping_slow, watch.ping_slow[:10]
    assert not watch.failures, f"{len(watch.failures)} failing answers, first: {watch.failures[:10]}"


def test_hostile_register_scale_and_list_parameters_are_refused_with_400(fuzz_server, watch):
    started, attacks = time.perf_counter(), parameter_attacks()
    answers = run_attacks(fuzz_server, watch, attacks)
    _finish(watch, "hostile parameters", started, len(answers), len(attacks))


def test_hostile_bodies_are_refused_and_no_worker_dies(fuzz_server, watch):
    started, attacks = time.perf_counter(), body_attacks()
    answers = run_attacks(fuzz_server, watch, attacks)
    _finish(watch, "hostile bodies", started, len(answers), len(attacks))


def every_operation(server: Any) -> list[tuple[str, str, str]]:
    """(port, method, target) of every operation each port's own /openapi.json lists (the metrics one at
    the metrics port), its path parameters set to a served model, its version and a listed file."""
    found = []
    for port in ("inference", "management"):
        with urllib.request.urlopen(getattr(server, port) + "/openapi.json", timeout=10) as resp:
            document = json.loads(resp.read())
        for path, item in document["paths"].items():
            for method, operation in item.items():
                serve_at = port if port in operation["x-ports"] else operation["x-ports"][0]
                if serve_at not in (port, "metrics") or (serve_at == "metrics" and port != "inference"):
                    continue
                model = "spare" if port == "management" and method in ("put", "delete") else "echo"
                values = {"model": model, "version": "1.0"}
                for param in operation.get("parameters", []):
                    if param["in"] == "path" and "enum" in param["schema"]:
                        values[param["name"]] = param["schema"]["enum"][0]
                found.append((serve_at, method.upper(), path.format(**values)))
    return found


def test_cross_site_requests_get_403_and_malformed_http_a_json_refusal(fuzz_server, watch):
    ports = {
        name: int(getattr(fuzz_server, name).rsplit(":", 1)[1])
        for name in ("inference", "management", "metrics")
    }
    attacks = header_attacks(ports)
    for port, method, target in every_operation(fuzz_server):  # every route, without a token: 403
        body = b"x" if method in ("POST", "PUT") else b""
        attacks.append(
            Attack(
                "any route, foreign Origin", port, method, target, body, (("Origin", FOREIGN_ORIGIN),), (403,)
            )
        )
        attacks.append(
            Attack("any route, forged Host", port, method, target, body, (("Host", FOREIGN_HOST),), (403,))
        )
    started = time.perf_counter()
    answers = run_attacks(fuzz_server, watch, attacks)
    _finish(watch, "hostile headers", started, len(answers), len(attacks))
