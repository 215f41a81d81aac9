"""The supervisor's state vocabulary, written down once: a model's state and a worker's, and who writes each.

Each state is written only by the object that owns it: ``ModelState`` by the model's ``WorkerPool``
(``pool.py``), ``WorkerState`` by its ``WorkerProcess`` (``worker_handle.py``); everyone else reads.
The values are the strings TorchServe's APIs show (``status`` in describe-model and on the page), so a
name here may say more than its value: an IDLE worker is shown as TorchServe's "READY".
"""

from __future__ import annotations

import enum

from archiver.errors import ServiceUnavailableError


class ModelState(str, enum.Enum):
    """A model version's serving state: LOADING → READY (or FAILED); FAILED → LOADING when scaled again;
    any → STOPPED once it is unregistered or the server shuts down (its workers end)."""

    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


class WorkerState(str, enum.Enum):
    """A worker process's life: STARTING → IDLE ⇄ BUSY → STOPPING → DEAD (or STARTING → DEAD)."""

    STARTING = "STARTING"
    IDLE = "READY"  # waiting for a batch; TorchServe's describe API calls this READY
    BUSY = "BUSY"
    STOPPING = "STOPPING"
    DEAD = "DEAD"


def unavailable(model: str, state: ModelState, reason: str | None = None) -> ServiceUnavailableError:
    """The one 503 for a model that cannot answer in ``state`` (``reason``: why it FAILED)."""
    if state is ModelState.FAILED:
        return ServiceUnavailableError(f'model "{model}" failed: {reason}')
    if state is ModelState.STOPPED:
        return ServiceUnavailableError(f'model "{model}" is shutting down')
    return ServiceUnavailableError(f'model "{model}" is not ready yet (state {state.value})')
