"""The requests schemathesis generates from each port's own /openapi.json, written as JSON to stdout.

    python tests/fuzz/openapi_requests.py INFERENCE_URL MANAGEMENT_URL METRICS_URL

tests/fuzz/test_openapi_fuzz.py runs this in a process of its own: schemathesis's generation patches
Hypothesis for the whole process it runs in (its printer, its buffer size), which the other Hypothesis
tests of the suite must not inherit. Each request is one JSON object: the operation's label, the
method, the URL with its query, the headers and the body (base64), exactly as ``requests`` would
send it. Generation is derandomized: the same requests every run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

EXAMPLES = 20  # per operation and mode, each sent again for every served model: about 2,800 requests
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


def generated_requests(bases: dict[str, str]) -> list[tuple[str, Any, str]]:
    """(operation label, case, base URL) for every operation of every port's own document."""
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


def as_json(label: str, case: Any, base: str) -> dict[str, Any]:
    """One case as the exact request ``requests`` would send, less schemathesis's test-case header."""
    kwargs = case.as_transport_kwargs(base_url=base)
    kwargs["headers"] = {k: v for k, v in kwargs["headers"].items() if not k.startswith("X-Schemathesis")}
    kwargs.pop("cookies", None)
    prepared = requests.Request(**kwargs).prepare()
    body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body or b""
    return {
        "label": label,
        "method": prepared.method,
        "url": prepared.url,
        "headers": dict(prepared.headers),
        "body": base64.b64encode(body).decode(),
    }


if __name__ == "__main__":
    inference, management, metrics = sys.argv[1:4]
    bases = {"inference": inference, "management": management, "metrics": metrics}
    json.dump([as_json(*planned) for planned in generated_requests(bases)], sys.stdout)
