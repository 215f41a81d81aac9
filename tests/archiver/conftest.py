"""Fixtures for the archive tests: a folder of real model inputs (handler, weights, labels, config)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

HANDLER_SOURCE = '''"""A tiny function handler: echoes the batch back."""


def handle(data, context):
    if not data:
        return None
    return [len(item.get("body") or item.get("data") or b"") for item in data]
'''


@dataclass
class ModelInputs:
    """The files a user would pass to model-archiver, made fresh in a temp folder."""

    root: Path
    handler: Path
    weights: Path
    labels: Path
    config: Path
    requirements: Path

    def build_kwargs(self, **overrides) -> dict:
        kwargs = dict(
            model_name="tiny",
            version="1.0",
            handler=str(self.handler),
            serialized_file=str(self.weights),
            extra_files=str(self.labels),
            export_path=str(self.root / "model-store"),
        )
        kwargs.update(overrides)
        return kwargs


@pytest.fixture
def model_inputs(tmp_path: Path) -> ModelInputs:
    src = tmp_path / "src"
    src.mkdir()
    handler = src / "my_handler.py"
    handler.write_text(HANDLER_SOURCE)
    weights = src / "weights.pt"
    weights.write_bytes(os.urandom(200_000))
    labels = src / "index_to_name.json"
    labels.write_text('{"0": "cat", "1": "dog"}\n')
    config = src / "model-config.yaml"
    config.write_text("batchSize: 4\nmaxBatchDelay: 50\nhandler:\n  topk: 2\n")
    requirements = src / "requirements.txt"
    requirements.write_text("numpy\n")
    return ModelInputs(tmp_path, handler, weights, labels, config, requirements)


@pytest.fixture
def epoch(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pin SOURCE_DATE_EPOCH so archives are byte-for-byte reproducible."""
    value = 1_700_000_000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(value))
    return value
