"""The allowed range of every serving setting: one checker for every way a setting arrives.

The command line, ``--config``, an archive's model-config.yaml and the management API all send their
values through ``check`` (already typed) or ``parse`` (text from a query string), so a value one of
them refuses every other refuses too, with the same message: the parameter as its source spells it
and the range it may take. Nothing here imports aiohttp, click or torch: the CLI, the archiver and
the server's front all use it.

Why bounds at all: a setting is an allocation or a wait. ``min_worker=1000000`` forks until the
machine stops answering, ``response_timeout=nan`` fails every request, ``-1`` kills every worker,
a negative memory limit restarts workers forever. Each range below is wide enough for any real
deployment and narrow enough that no value in it can take the server down.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from archiver.errors import UsageError

_DAY_S = 86400.0


def default_max_workers_per_model() -> int:
    """Four workers per core the server may use, and never fewer than four.

    A worker is a process holding its own copy of the model, busy on the CPU while it runs a batch:
    past a few per core they only take turns (and memory), so no real deployment scales one model
    further; handlers that mostly wait on a GPU or on I/O still get four per core. The ceiling stops
    a typo (or a hostile ``min_worker=1000000``) from forking until the machine stops answering.
    """
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cgroups)
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(4, 4 * cores)


@dataclass(frozen=True)
class Bound:
    """The range of one setting: ``low`` (inclusive, or exclusive when ``low_open``) to ``high``.

    ``off`` means 0 is also accepted, as "no limit" (a memory limit). ``unit`` is said in messages.
    """

    integer: bool
    low: float
    high: float
    low_open: bool = False
    off: bool = False
    unit: str = ""

    def describe(self, high: float | None = None) -> str:
        """The range in words: "an integer from 0 to 8", "a number > 0 and <= 86400 (seconds)"."""
        top = self.high if high is None else high
        unit = f" ({self.unit})" if self.unit else ""
        if self.integer:
            text = f"an integer from {_num(self.low)} to {_num(top)}"
        elif self.low_open:
            text = f"a number > {_num(self.low)} and <= {_num(top)}"
        else:
            text = f"a number from {_num(self.low)} to {_num(top)}"
        if self.off:
            text = f"0 (no limit) or {text}"
        return text + unit


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Setting (as ModelSettings / ServerSettings name it) -> its bound. docs/serving.md has the same table.
BOUNDS: dict[str, Bound] = {
    # the top is the server's --max-workers-per-model; this is the ceiling that setting may take
    "workers": Bound(integer=True, low=0, high=4096),
    "max_workers_per_model": Bound(integer=True, low=1, high=4096),
    # the most requests one batch (one message to a worker) may hold; also what one request may carry
    "batch_size": Bound(integer=True, low=1, high=1024),
    "max_batch_delay_ms": Bound(integer=False, low=0, high=60_000, unit="milliseconds"),
    "response_timeout_s": Bound(integer=False, low=0, high=_DAY_S, low_open=True, unit="seconds"),
    "load_timeout_s": Bound(integer=False, low=0, high=_DAY_S, low_open=True, unit="seconds"),
    "queue_size": Bound(integer=True, low=1, high=100_000),
    # below a few MB no Python process lives; above 16 TiB no machine has the memory
    "worker_memory_limit_mb": Bound(integer=False, low=1, high=2**24, off=True, unit="MB"),
    "max_worker_deaths": Bound(integer=True, low=1, high=1000),
    "worker_death_window_s": Bound(integer=False, low=0, high=_DAY_S, low_open=True, unit="seconds"),
    "restart_backoff_s": Bound(integer=False, low=0, high=3600, low_open=True, unit="seconds"),
    "torch_threads": Bound(integer=True, low=1, high=1024),
    "max_request_size": Bound(integer=True, low=1, high=2**30, unit="bytes"),
    "max_request_items": Bound(integer=True, low=1, high=65536),
    "port": Bound(integer=True, low=0, high=65535),
    # sequence batching (stateful models, supervisor/sequences.py): each open sequence holds state in a
    # worker and a queue in the front, so their number and queues are bounded like any other queue
    "max_num_sequence": Bound(integer=True, low=1, high=100_000),
    "max_sequence_job_queue_size": Bound(integer=True, low=1, high=10_000),
    "sequence_max_idle_ms": Bound(integer=False, low=0, high=_DAY_S * 1000, unit="milliseconds"),
    "sequence_timeout_ms": Bound(integer=False, low=1, high=_DAY_S * 1000, off=True, unit="milliseconds"),
}

# A query value longer than this is refused before it is converted (int() of 4,000 digits is work).
_MAX_TEXT = 40


def check(setting: str, value: Any, name: str | None = None, *, high: float | None = None) -> Any:
    """``value`` if it is in ``setting``'s range, else UsageError naming ``name`` and the range.

    ``name`` is the parameter as the caller's source spells it (``--workers``, ``initial_workers``,
    ``minWorkers in model-config.yaml``); ``high`` narrows the top (the server's worker maximum).
    A memory limit of 0 is kept: the pool reads 0 as no limit, and it overrides a limit set elsewhere.
    """
    bound = BOUNDS[setting]
    name = name or setting
    top = bound.high if high is None else min(high, bound.high)
    wrong = UsageError(f"{name} must be {bound.describe(top)}, got {_shown(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong
    if bound.integer and not isinstance(value, int):
        raise wrong
    if not math.isfinite(value):
        raise wrong
    if bound.off and value == 0:
        return value
    below = value <= bound.low if bound.low_open else value < bound.low
    if below or value > top:
        raise wrong
    return value


def parse(setting: str, text: str, name: str | None = None, *, high: float | None = None) -> Any:
    """A query-string value checked as ``check`` does; "", "nan", "inf", "1e999", "abc" are refused."""
    bound = BOUNDS[setting]
    name = name or setting
    top = bound.high if high is None else min(high, bound.high)
    stripped = text.strip()
    try:
        if not stripped or len(stripped) > _MAX_TEXT:
            raise ValueError(text)
        value: float = int(stripped) if bound.integer else float(stripped)
        return check(setting, value, name, high=high)
    except (ValueError, UsageError):  # the message shows the text as sent, not as converted
        raise UsageError(f"{name} must be {bound.describe(top)}, got {_shown(text)}") from None


# serve's settings, as its flags (dashes as underscores) and --config keys name them -> their bound.
SERVE_SETTINGS: dict[str, str] = {
    "port": "port",
    "management_port": "port",
    "metrics_port": "port",
    "workers": "workers",
    "batch_size": "batch_size",
    "max_batch_delay": "max_batch_delay_ms",
    "response_timeout": "response_timeout_s",
    "job_queue_size": "queue_size",
    "max_request_size": "max_request_size",
    "max_request_items": "max_request_items",
    "worker_memory_limit": "worker_memory_limit_mb",
    "torch_threads": "torch_threads",
    "max_worker_deaths": "max_worker_deaths",
    "worker_death_window": "worker_death_window_s",
    "restart_backoff": "restart_backoff_s",
    "max_workers_per_model": "max_workers_per_model",
}


def check_serve_settings(flags: dict[str, Any], config: dict[str, Any], config_name: str | None) -> int:
    """Check every ``serve`` setting given as a flag (``flags``) or in ``--config`` (``config``), each
    named as it was given; return the most workers per model (given, or the default)."""

    def given(key: str) -> tuple[Any, str]:
        if flags.get(key) is not None:
            return flags[key], "--" + key.replace("_", "-")
        return config.get(key), f"{key} in {config_name}"

    value, name = given("max_workers_per_model")
    top = default_max_workers_per_model() if value is None else check("max_workers_per_model", value, name)
    for key, setting in SERVE_SETTINGS.items():
        value, name = given(key)
        if value is None:
            continue
        if setting != "workers":
            check(setting, value, name)
            continue
        try:
            check(setting, value, name, high=top)
        except UsageError as exc:
            over = isinstance(value, int) and value > top
            hint = f" (at most --max-workers-per-model, {top} here)" if over else ""
            raise UsageError(exc.message + hint) from None
    return top


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 50 else text[:47] + "..."
