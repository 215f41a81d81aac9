"""A handler's answer leaves as TorchServe writes it, ``json.dumps(value, indent=2)``, byte for byte,
whichever encoder path it takes (flat lists and dicts go through json's C encoder)."""

from __future__ import annotations

import json
import random

import pytest

from archiver.errors import ArchiverError
from archiver.serving.protocols.records import encode_answer


def _answers() -> list[object]:
    fixed: list[object] = [
        [0.1, -2.5e-300, 1e300, 3, True, None, 'quote " and\nnewline', "é", float("nan"), float("inf")],
        {"tabby": 0.41, "tiger cat": 0.37, "7": None, "ok": False},
        {1: "int key", 2.5: "float key", None: "none key", False: "bool key"},
        [],
        {},
        [[0.1, 0.2], [0.3]],
        [{"label": "cat"}],
        {"nested": {"a": 1}},
        "plain text is not JSON",
        5,
        None,
        [1],
    ]
    rng = random.Random(15)
    scalars = [
        lambda: rng.random() * 10 ** rng.randint(-30, 30),
        lambda: rng.randint(-(10**20), 10**20),
        lambda: "s" * rng.randint(0, 3),
        lambda: None,
        lambda: rng.random() < 0.5,
    ]
    for _ in range(300):
        size = rng.randint(1, 8)
        fixed.append([rng.choice(scalars)() for _ in range(size)])
        fixed.append({str(rng.random()): rng.choice(scalars)() for _ in range(size)})
    return fixed


def test_answers_are_indented_json_byte_for_byte():
    for answer in _answers():
        if isinstance(answer, str):
            continue  # a str is sent as text, not JSON
        body, content_type = encode_answer(answer)
        assert body == json.dumps(answer, indent=2).encode("utf-8"), answer
        assert content_type == "application/json"


@pytest.mark.parametrize("answer", [[object()], {(1, 2): 1}, {"a": {1, 2}}])
def test_an_answer_json_cannot_hold_is_a_clear_error(answer):
    with pytest.raises(ArchiverError, match="cannot be sent as JSON"):
        encode_answer(answer)
