"""TorchServe's ``ts.torch_handler.text_handler.TextHandler`` and ``contractions.CONTRACTION_MAP``.

TextHandler is the base of TorchServe's text handlers: the model loaded by our BaseHandler, a
``source_vocab`` (``source_vocab.pt``, or the manifest's ``sourceVocab``) and the cleaning helpers its
subclasses call (``_expand_contractions``, ``_remove_html_tags``, ``_tokenize``...). The tokenizer is
torchtext's ``basic_english`` rebuilt here (``handlers.text``). CONTRACTION_MAP is built from rules
(``n't``, ``'ll``, ``'ve``... after the words that take them, and the irregular forms), so it holds
TorchServe's common entries, not its exact list.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from pathlib import Path
from typing import Any

import torch

from archiver.errors import HandlerError
from handlers.base import BaseHandler
from handlers.ts_utils import CLEANUP_REGEX, get_tokenizer

logger = logging.getLogger(__name__)


def _contraction_map() -> dict[str, str]:
    table = {
        "ain't": "is not",
        "can't": "cannot",
        "won't": "will not",
        "shan't": "shall not",
        "sha'n't": "shall not",
        "mayn't": "may not",
        "let's": "let us",
        "'cause": "because",
        "o'clock": "of the clock",
        "ma'am": "madam",
        "y'all": "you all",
    }
    for verb in [
        "are",
        "could",
        "did",
        "does",
        "do",
        "had",
        "has",
        "have",
        "is",
        "might",
        "must",
        "need",
        "ought",
        "should",
        "was",
        "were",
        "would",
    ]:
        table[f"{verb}n't"] = f"{verb} not"
    for modal in ["could", "might", "must", "should", "would", "will"]:
        table[f"{modal}'ve"] = f"{modal} have"
    subjects = [
        "I",
        "i",
        "you",
        "he",
        "she",
        "it",
        "we",
        "they",
        "that",
        "there",
        "what",
        "who",
        "where",
        "how",
        "when",
        "why",
        "y'all",
    ]
    for who in subjects:
        table[f"{who}'d"] = f"{who} would"
        table[f"{who}'ll"] = f"{who} will"
        table[f"{who}'ve"] = f"{who} have"
        table[f"{who}'d've"] = f"{who} would have"
    for who in ["you", "we", "they", "what", "y'all"]:
        table[f"{who}'re"] = f"{who} are"
    for who in ["he", "she", "it", "that", "there", "what", "who", "where", "how", "when", "why", "so"]:
        table[f"{who}'s"] = f"{who} is"
    table["I'm"], table["i'm"] = "I am", "i am"
    return table


CONTRACTION_MAP = _contraction_map()
# Longest first: "you'd've" must win over "you'd".
CONTRACTIONS_PATTERN = re.compile(
    "({})".format("|".join(re.escape(k) for k in sorted(CONTRACTION_MAP, key=len, reverse=True))),
    flags=re.IGNORECASE | re.DOTALL,
)


class TextHandler(BaseHandler):
    """TorchServe's base for text handlers: the vocabulary, the tokenizer and the cleaning steps."""

    def __init__(self) -> None:
        super().__init__()
        self.source_vocab: Any = None
        self.tokenizer = get_tokenizer("basic_english")
        self.input_text: Any = None
        self.lig: Any = None

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        self.initialized = False
        named = (self.manifest or {}).get("model", {}).get("sourceVocab")
        self.source_vocab = _load_vocab(Path(named) if named else self.get_source_vocab_path(context))
        self.lig = _layer_gradients(self.model)
        self.initialized = True

    def get_source_vocab_path(self, ctx: Any) -> Path:
        path = Path(ctx.system_properties.get("model_dir")) / "source_vocab.pt"
        if not path.is_file():
            raise HandlerError(
                "text_handler needs source_vocab.pt in the archive (--extra-files), as TorchServe's does"
            )
        return path

    def _expand_contractions(self, text: str) -> str:
        def expand(match: re.Match[str]) -> str:
            found = match.group(0)
            expanded = CONTRACTION_MAP.get(found) or CONTRACTION_MAP.get(found.lower()) or found
            return found[0] + expanded[1:]

        return CONTRACTIONS_PATTERN.sub(expand, text).replace("'", "")

    def _remove_accented_characters(self, text: str) -> str:
        return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("utf-8", "ignore")

    def _remove_html_tags(self, text: str) -> str:
        return CLEANUP_REGEX.sub("", text)

    def _remove_puncutation(self, *args: Any, **kwargs: Any) -> str:
        """TorchServe's misspelt name, kept for the handlers that call it."""
        return self._remove_punctuation(*args, **kwargs)

    def _remove_punctuation(self, text: str) -> str:
        return text.translate(str.maketrans("", "", string.punctuation))

    def _tokenize(self, text: str) -> list[str]:
        return self.tokenizer(text)

    def get_word_token(self, input_tokens: list[str]) -> list[str]:
        """The tokens without the BPE tokenizers' space marker."""
        return [token.replace("Ġ", "") for token in input_tokens]

    def summarize_attributions(self, attributions: torch.Tensor) -> torch.Tensor:
        attributions = torch.softmax(attributions, dim=-1)
        return attributions / torch.norm(attributions.sum(dim=-1))


def _load_vocab(path: Path) -> Any:
    """The archive's pickled vocabulary (a torchtext Vocab, usually): the archive's own code, trusted
    as its handler is; torchtext must be installed to unpickle one."""
    try:
        return torch.load(path, weights_only=False)
    except ModuleNotFoundError as exc:
        raise HandlerError(f"{path.name} needs the module {exc.name!r} to load (pip install it)") from exc


def _layer_gradients(model: Any) -> Any:
    """Captum's LayerIntegratedGradients over the model's ``embedding``, where both exist."""
    embedding = getattr(model, "embedding", None)
    if embedding is None:
        return None
    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError:
        return None
    return LayerIntegratedGradients(model, embedding)
