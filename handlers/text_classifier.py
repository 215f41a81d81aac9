"""The ``text_classifier`` default handler: UTF-8 text in, ``{label: probability}`` over all classes out.

Calls the model TorchServe's way, ``model(token_ids, offsets)`` (an ``nn.EmbeddingBag`` classifier), but
for the whole batch at once: TorchServe's version answers only the first request of a batch. The
vocabulary is a plain ``vocab.json`` (token → id) in the archive, read as JSON, where TorchServe
unpickles a ``source_vocab.pt``. Unknown tokens map to ``<unk>`` when the vocabulary has it, else are
dropped.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from archiver.errors import ConfigError, HandlerError, HandlerInputError
from handlers.base import BaseHandler, payload_of
from handlers.labels import label_for
from handlers.text import decode_text, tokenize

VOCAB_FILE = "vocab.json"
UNKNOWN = "<unk>"


class TextClassifier(BaseHandler):
    """Bag of n-grams in, softmax over the classes out, one row per request."""

    def __init__(self) -> None:
        super().__init__()
        self.vocab: dict[str, int] = {}
        self.ngrams = 2

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        config = self.handler_config()
        name = config.get("vocab", VOCAB_FILE)
        path = self.model_dir / str(name)
        if not path.is_file():
            raise HandlerError(f"text_classifier needs {name} (token -> id) in the archive (--extra-files)")
        try:
            vocab = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise HandlerError(f"{name} is not valid JSON: {exc}") from exc
        if not isinstance(vocab, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()
        ):
            raise HandlerError(f"{name} must be a JSON object of token -> integer id")
        self.vocab = vocab
        ngram = config.get("ngrams", 2)
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
            raise ConfigError(f"handler.ngrams in model-config.yaml must be an integer >= 1, got {ngram!r}")
        self.ngrams = ngram

    def token_ids(self, text: str) -> list[int]:
        unknown = self.vocab.get(UNKNOWN)
        ids = [self.vocab.get(token, unknown) for token in tokenize(text, self.ngrams)]
        return [i for i in ids if i is not None]

    def preprocess(self, data: list[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        rows: list[list[int]] = []
        for index, row in enumerate(data):
            try:
                rows.append(self.token_ids(decode_text(payload_of(row))))
            except HandlerInputError as exc:
                self.reject(index, exc)
        if not rows:
            return None
        offsets = [0]
        for ids in rows[:-1]:
            offsets.append(offsets[-1] + len(ids))
        flat = [i for ids in rows for i in ids]
        return (
            torch.tensor(flat, dtype=torch.int64, device=self.device),
            torch.tensor(offsets, dtype=torch.int64, device=self.device),
        )

    def inference(self, data: tuple[torch.Tensor, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        token_ids, offsets = data
        with torch.inference_mode():
            return self.model(token_ids, offsets)

    def postprocess(self, data: torch.Tensor) -> list[dict[str, float]]:
        probs = torch.softmax(data.float(), dim=1).tolist()
        return [{label_for(self.mapping, c): p for c, p in enumerate(row)} for row in probs]
