"""Requests generated from the server's own /openapi.json by schemathesis, both fitting the document and
breaking it, sent to a live server: no 5xx, JSON errors, no worker death, /ping answering throughout.

Each port hands out its own document; every operation it lists for itself is fuzzed at that port (the
metrics operation at the metrics port). Path parameters are generated, and also set to the served
models (``echo``, ``linear``; destructive operations only ever name ``spare``) so the requests reach
the handlers. Generation is derandomized: the same requests every run (their order at the server
varies with the four sending threads).
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

EXAMPLES = 20  # per operation and mode, each sent again for every served model: about 2,800 requests
CONCURRENCY = 4  # threads sending: the server sees requests in flight together, as it does in use
DESTRUCTIVE = {"DELETE", "PUT"}  # on the management port: scale, unregister, set-default


def _variants(method: str, path: str, port: str) -> list[dict[str, str]]:
    """Path parameters to send each generated case with, besides its own: the served models."""
    if "{model}" not in path:
        return []
    names = ["spare"] if port == "management" and method in DESTRUCTIVE else ["echo", "linear"]
    if "{version}" not in path:
        return [{"model": name} for name in names]
    return [{"model": name, "version": version} for name in names for version in ("1.0", "9.9")]


def _cases(operation: Any, mode: GenerationMode) -> list[Any]:
    """Up to EXAMPLES cases of one operation, the same ones every run."""
    found: list[Any] = []

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def collect(case: Any) -> None:
        found.append(case)

    # Unsatisfiable: no parameters and no body, nothing to break; the positive case covers it.
    with contextlib.suppress(Unsatisfiable):
        collect()
    return found


def _modes(definition: dict[str, Any]) -> list[GenerationMode]:
    """Both modes, or only the positive one where nothing in the document can be broken (an operation
    whose only parameters are free path strings: every string fits them)."""
    params = definition.get("parameters", [])
    breakable = "requestBody" in definition or any(
        p["in"] != "path" or p["schema"] != {"type": "string"} for p in params
    )
    return list(GenerationMode) if breakable else [GenerationMode.POSITIVE]


def _with_path(case: Any, fixed: dict[str, str]) -> Any:
    """The same request, sent to other path parameters (the served models instead of generated names)."""
    copy = case.derive()
    copy.path_parameters.update(fixed)
    return copy


def generated_requests(fuzz_server: Any) -> list[tuple[str, Any, str]]:
    """(operation label, case, base URL) for every operation of every port's own document."""
    bases = {"inference": fuzz_server.inference, "management": fuzz_server.management}
    bases["metrics"] = fuzz_server.metrics
    planned = []
    for port in ("inference", "management"):
        document = requests.get(bases[port] + "/openapi.json", timeout=10).json()
        schema = schemathesis.openapi.from_dict(document)
        for result in schema.get_all_operations():
            operation = result.ok()
            ports = operation.definition.raw["x-ports"]
            at = (
                port if port in ports else "metrics" if ports == ["metrics"] and port == "inference" else None
            )
            if at is None:
                continue
            variants = _variants(operation.method.upper(), operation.path, at)
            for mode in _modes(operation.definition.raw):
                for case in _cases(operation, mode):
                    planned.append((operation.label, case, bases[at]))
                    planned += [(operation.label, _with_path(case, fixed), bases[at]) for fixed in variants]
    return planned


def _describe(kwargs: dict[str, Any]) -> str:
    body = kwargs.get("data", kwargs.get("json", kwargs.get("files")))
    headers = {
        k: v for k, v in kwargs.get("headers", {}).items() if k.lower() in ("content-type", "host", "origin")
    }
    query = f" params={kwargs['params']}" if kwargs.get("params") else ""
    return f"{kwargs['method']} {kwargs['url']}{query} {headers} body={str(body)[:160]!r}"


def send_all(planned: list[tuple[str, Any, str]], watch: Any) -> None:
    """Send every case from a few threads; each answer goes to the watch."""
    local = threading.local()

    def send(item: tuple[str, Any, str]) -> None:
        label, case, base = item
        if watch.server_stuck:
            return
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        kwargs = case.as_transport_kwargs(base_url=base)
        kwargs["headers"] = {k: v for k, v in kwargs["headers"].items() if not k.startswith("X-Schemathesis")}
        what = f"{label}: {_describe(kwargs)}"
        try:
            reply = session.request(**kwargs, timeout=15, allow_redirects=False)
        except requests.RequestException as exc:
            watch.judge(label, what, None, {}, f"{type(exc).__name__}: {exc}".encode())
            return
        watch.judge(label, what, reply.status_code, reply.headers, reply.content)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(send, planned))


def test_requests_generated_from_the_servers_own_openapi_document_never_break_it(fuzz_server, watch):
    started = time.perf_counter()
    planned = generated_requests(fuzz_server)
    generated = time.perf_counter() - started
    send_all(planned, watch)
    seconds = time.perf_counter() - started
    workers = watch.worker_problems()
    print("\n" + watch.summary("OpenAPI fuzz", seconds) + f" (generating them took {generated:.1f} s)")
    for line in [*workers, *watch.ping_slow[:10], *watch.report()]:
        print("  " + line)

    assert watch.total() == len(planned), (
        f"{len(planned) - watch.total()} requests never sent: the server froze"
    )
    assert watch.total() >= 2000, f"only {watch.total()} requests: the generation lost operations"
    assert not workers, workers
    assert not watch.ping_slow, watch.ping_slow[:10]
    assert not watch.failures, f"{len(watch.failures)} failing answers, first: {watch.failures[:10]}"
    assert seconds < 120, f"the fuzz took {seconds:.0f} s, over its 2-minute budget"
