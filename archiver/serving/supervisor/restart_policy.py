"""When a worker's ending makes its model FAILED, and how long its restart waits: the supervisor's rules.

An ending counts by what the worker was doing (``Death.during``):

- ``batch``: it had taken a batch (its handler was running requests), so a request may have caused
  it. These never make the model FAILED, as in TorchServe, which never gives up on them: otherwise one
  client sending a few poison requests would take the model away from every other client. Each costs
  its batch, and the slot's restart backs off with its streak of such endings (1, 1, 2, 3, 5, 8 times
  ``backoff_s``, then no longer, so a model with one worker is back within 8 backoffs and the
  requests of everyone else queued behind the poison are answered); the streak ends with the slot's
  next answered batch (with a memory limit, once the worker is found within it after that batch). A
  stop for memory right after an answered batch is counted here too (``pool.py`` says when).
- ``idle`` (it held no batch) and ``start`` (it could not load when restarted): no request did this;
  it is the model's own crash loop. After ``max_deaths`` of these within ``window_s`` the model is
  FAILED; before that the restart waits 1, 1, 2, 3, 5 … times ``backoff_s`` by their count.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

_FIBONACCI = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
# A streak of endings in batches backs off this many steps at most (8 x backoff_s): long enough that
# poison requests cannot keep a heavy model loading all the time, short enough that everyone else's
# requests, queued behind them, are still answered.
BATCH_DEATH_MAX_STEP = 6
DURING = ("batch", "idle", "start")


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a worker and when to give up on the model."""

    backoff_s: float = 1.0
    max_deaths: int = 5
    window_s: float = 60.0
    load_timeout_s: float = 300.0

    def delay_s(self, recent_deaths: int) -> float:
        index = min(max(recent_deaths, 1), len(_FIBONACCI)) - 1
        return _FIBONACCI[index] * self.backoff_s

    def batch_death_delay_s(self, streak: int) -> float:
        """The restart delay after the ``streak``-th ending in a batch in a row on one slot."""
        return self.delay_s(min(streak, BATCH_DEATH_MAX_STEP))


@dataclass(frozen=True)
class Death:
    """One worker ending the supervisor did not ask for, as ``GET /models/{m}`` lists it."""

    at: float  # wall clock, for people
    monotonic_at: float  # for counting the crash-loop window
    slot: int
    pid: int | None
    cause: str
    message: str
    during: str = "idle"  # "batch", "idle" or "start" (the module's docstring)

    def describe(self) -> dict[str, Any]:
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "worker": str(self.slot),
            "pid": self.pid,
            "cause": self.cause,
            "message": self.message,
            "during": self.during,
        }


@dataclass(frozen=True)
class Verdict:
    """What to do after an ending: restart after ``delay_s``, or fail the model (``fail``)."""

    fail: bool
    delay_s: float
    counted: int  # endings within the window that count toward FAILED


class DeathLog:
    """The endings of one model's workers, and the rules above applied to each new one."""

    def __init__(self, policy: RestartPolicy, keep: int = 50) -> None:
        self.policy = policy
        self.deaths: deque[Death] = deque(maxlen=keep)
        self.count_since = 0.0  # a FAILED model scaled again starts its count afresh
        self._streaks: dict[int, int] = {}  # by slot: endings in batches since it answered one

    def record(self, death: Death) -> Verdict:
        """Keep ``death`` and say whether the model fails now or how long the slot's restart waits."""
        self.deaths.append(death)
        policy = self.policy
        if death.during == "batch":
            streak = self._streaks[death.slot] = self._streaks.get(death.slot, 0) + 1
            return Verdict(False, policy.batch_death_delay_s(streak), 0)
        since = max(death.monotonic_at - policy.window_s, self.count_since)
        counted = sum(1 for d in self.deaths if d.monotonic_at >= since and d.during != "batch")
        return Verdict(counted >= policy.max_deaths, policy.delay_s(counted), counted)

    def answered(self, slot: int) -> None:
        """The slot's worker answered a batch: its streak of endings in batches is over."""
        if self._streaks:
            self._streaks.pop(slot, None)

    def restart_counting(self) -> None:
        """Count toward FAILED only endings from now on (the model was started afresh)."""
        self.count_since = time.monotonic()
        self._streaks.clear()
