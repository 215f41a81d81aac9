"""Text in: decode a request's payload as UTF-8 and tokenize it the way TorchServe's text handlers do.

TorchServe's TextHandler cleans text (accents, HTML tags, lower case, contractions, punctuation), splits
it with torchtext's ``basic_english`` tokenizer and adds n-grams (bigrams for the text classifier).
torchtext is retired, so the steps are reimplemented here; a vocabulary built with these functions
gives the same token ids at training and serving time.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterator
from typing import Any

from archiver.errors import HandlerInputError

_HTML_TAG = re.compile(r"<.*?>")
# The common English contractions. TorchServe expands from a table of ~120 entries; these rules cover
# the regular forms ("n't", "'re", "'ll", ...) plus the irregular ones that the rules would get wrong.
_IRREGULAR = {
    "won't": "will not",
    "can't": "cannot",
    "shan't": "shall not",
    "ain't": "is not",
    "let's": "let us",
}
# "'s" is a possessive after a noun; after these words it is "is", as in TorchServe's table.
_IRREGULAR.update(
    {f"{w}'s": f"{w} is" for w in ("it", "he", "she", "that", "what", "there", "here", "who", "where", "how")}
)
_IRREGULAR_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in _IRREGULAR) + r")\b")
_SUFFIXES = [
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'re\b"), " are"),
    (re.compile(r"'ll\b"), " will"),
    (re.compile(r"'ve\b"), " have"),
    (re.compile(r"'m\b"), " am"),
    (re.compile(r"'d\b"), " would"),
]
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# torchtext's basic_english normalisation, in its order.
_BASIC_ENGLISH = [
    (re.compile(r"\'"), " '  "),
    (re.compile(r"\""), ""),
    (re.compile(r"\."), " . "),
    (re.compile(r"<br \/>"), " "),
    (re.compile(r","), " , "),
    (re.compile(r"\("), " ( "),
    (re.compile(r"\)"), " ) "),
    (re.compile(r"\!"), " ! "),
    (re.compile(r"\?"), " ? "),
    (re.compile(r"\;"), " "),
    (re.compile(r"\:"), " "),
    (re.compile(r"\s+"), " "),
]


def decode_text(payload: Any) -> str:
    """The request's text: a str as is, bytes as strict UTF-8; HandlerInputError for anything else."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HandlerInputError(f"text must be UTF-8: invalid byte at position {exc.start}") from exc
    if not isinstance(payload, str):
        raise HandlerInputError(f"expected text, got a JSON {type(payload).__name__}")
    if not payload.strip():
        raise HandlerInputError("expected text, got an empty body")
    return payload


def clean_text(text: str) -> str:
    """TorchServe's TextHandler cleaning: accents, HTML tags, lower case, contractions, punctuation."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = _HTML_TAG.sub("", text).lower().replace("\u2019", "'")
    text = _IRREGULAR_RE.sub(lambda m: _IRREGULAR[m.group(1)], text)
    for pattern, replacement in _SUFFIXES:
        text = pattern.sub(replacement, text)
    return text.translate(_PUNCTUATION)


def basic_english(text: str) -> list[str]:
    """torchtext's ``basic_english`` tokenizer: lower case, split punctuation off, split on spaces."""
    text = text.lower()
    for pattern, replacement in _BASIC_ENGLISH:
        text = pattern.sub(replacement, text)
    return text.split()


def ngrams(tokens: list[str], n: int = 2) -> Iterator[str]:
    """The tokens, then each run of 2..n consecutive tokens joined by a space (torchtext's order)."""
    yield from tokens
    for size in range(2, n + 1):
        for start in range(len(tokens) - size + 1):
            yield " ".join(tokens[start : start + size])


def tokenize(text: str, n: int = 2) -> list[str]:
    """Clean, tokenize and add n-grams: the tokens a vocabulary is looked up with."""
    return list(ngrams(basic_english(clean_text(text)), n))
