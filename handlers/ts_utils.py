"""TorchServe's small helpers that handlers import: ``ts.utils.util``, ``ts.utils.timeit_decorator`` and
``ts.handler_utils.text_utils``, with TorchServe's behaviour.

``PredictionException`` and ``list_classes_from_module`` live in ``handlers._ts_compat`` (the server
gives the former's ``error_code`` to the batch); the label helpers in ``handlers.labels``.
"""

from __future__ import annotations

import enum
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any

import yaml

from handlers.text import basic_english, ngrams

logger = logging.getLogger(__name__)

# HTML tags and character entities, which TorchServe's text handlers strip.
CLEANUP_REGEX = re.compile("<.*?>|&([a-z0-9]+|#[0-9]{1,6}|#x[0-9a-f]{1,6});")


class PT2Backend(str, enum.Enum):
    """The ``torch.compile`` backends TorchServe's ``pt2`` config accepts."""

    EAGER = "eager"
    AOT_EAGER = "aot_eager"
    INDUCTOR = "inductor"
    NVFUSER = "nvfuser"
    AOT_NVFUSER = "aot_nvfuser"
    AOT_CUDAGRAPHS = "aot_cudagraphs"
    OFI = "ofi"
    FX2TRT = "fx2trt"
    ONNXRT = "onnxrt"
    IPEX = "ipex"
    TORCHXLA_TRACE_ONCE = "torchxla_trace_once"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"
    HPU_BACKEND = "hpu_backend"


def check_valid_pt2_backend(backend: str) -> bool:
    """Whether ``backend`` is one of ``PT2Backend``; a warning in the log when not."""
    if backend in {member.value for member in PT2Backend}:
        return True
    logger.warning("%s is not a supported backend", backend)
    return False


def get_yaml_config(yaml_file_path: str | Path) -> dict[str, Any]:
    """A YAML file as data (safe loading: no Python objects are built from it)."""
    with open(yaml_file_path, encoding="utf-8") as file:
        return yaml.safe_load(file)


def deprecated(
    version: str, replacement: str = "", klass: type[Warning] = PendingDeprecationWarning
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: calling the function warns that it goes away in ``version``."""

    def deprecator(func: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            message = f"{func.__name__} is deprecated in {version} and moved to {replacement}"
            warnings.warn(message, klass, stacklevel=2)
            return func(*args, **kwargs)

        return wrapper

    return deprecator


def timeit(func: Callable[..., Any]) -> Callable[..., Any]:
    """``ts.utils.timeit_decorator.timeit``: print the call's wall and CPU time (TorchServe's own calls
    ``time.clock``, gone since Python 3.8, and fails; this one prints)."""

    @wraps(func)
    def time_and_log(*args: Any, **kwargs: Any) -> Any:
        start, start_cpu = time.time(), time.process_time()
        result = func(*args, **kwargs)
        wall, cpu = time.time() - start, time.process_time() - start_cpu
        print(
            f"func: {func.__name__!r} took a total of {wall:2.4f} sec to run and {cpu:2.4f} sec of CPU time"
        )
        return result

    return time_and_log


def ngrams_iterator(token_list: list[str], ngrams_count: int) -> Iterator[str]:
    """torchtext's ``ngrams_iterator``: the tokens, then their n-grams up to ``ngrams_count``."""
    return ngrams(list(token_list), ngrams_count)


def get_tokenizer(tokenizer: Any, language: str = "en") -> Callable[[str], list[str]]:
    """torchtext's ``get_tokenizer`` for what TorchServe's text handlers use: ``"basic_english"``,
    ``None`` (split on spaces) or a callable, which is returned as is."""
    if callable(tokenizer):
        return tokenizer
    if tokenizer is None:
        return str.split
    if tokenizer == "basic_english":
        if language != "en":
            raise ValueError("basic_english normalization only supports English (language='en')")
        return basic_english
    raise ValueError(
        f"tokenizer {tokenizer!r} is not provided here (torchtext is retired): use 'basic_english', None "
        "or pass your own callable"
    )
