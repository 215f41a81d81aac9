"""TorchServe's ``ts.handler_utils.micro_batching.MicroBatching``: a batch as a pipeline of micro-batches.

A handler sets ``self.handle = MicroBatching(self)``; each batch is then cut into micro-batches of
``micro_batch_size`` requests that flow through three thread groups, ``preprocess`` → ``inference`` →
``postprocess`` (``parallelism`` threads each, one by default), so the preprocessing of one
micro-batch overlaps the inference of the previous one. The answers come back in request order.

As TorchServe's, with three differences that keep a worker alive: an exception in any step fails the
batch (TorchServe's thread dies and the batch waits forever); a request the handler rejects in
``preprocess`` (``self.reject``) gets its own error, the rest of its micro-batch is answered; the
threads are daemons, so a worker whose handler forgot ``shutdown()`` still exits.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from copy import copy
from dataclasses import dataclass, field
from typing import Any

from archiver.errors import HandlerError

HANDLER_METHODS = ["preprocess", "inference", "postprocess"]
_POLL_S = 0.5  # how often an idle thread checks whether it should stop


class _ThreadRejects:
    """``handler._rejected`` for a micro-batching handler: each preprocess thread its own requests."""

    def __init__(self) -> None:
        self._local = threading.local()

    def current(self) -> dict[int, Any]:
        found = getattr(self._local, "rejected", None)
        if found is None:
            found = self._local.rejected = {}
        return found

    def __setitem__(self, index: int, error: Any) -> None:
        self.current()[index] = error

    def __getitem__(self, index: int) -> Any:
        return self.current()[index]

    def __contains__(self, index: object) -> bool:
        return index in self.current()

    def __bool__(self) -> bool:
        return bool(self.current())

    def get(self, index: int, default: Any = None) -> Any:
        return self.current().get(index, default)

    def take(self) -> dict[int, Any]:
        found = self.current()
        self._local.rejected = {}
        return found


@dataclass
class _Item:
    """One micro-batch on its way through the steps."""

    idx: int
    size: int
    value: Any = None
    rejected: dict[int, Any] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def empty(self) -> bool:
        return len(self.rejected) >= self.size


@dataclass
class WorkerThread:
    """A step's thread and the event that stops it (TorchServe's name)."""

    event: threading.Event
    thread: threading.Thread


class MicroBatching:
    """Runs a handler's preprocess, inference and postprocess on micro-batches, in thread groups."""

    def __init__(
        self, parent_handler: Any, micro_batch_size: int = 1, parallelism: dict[str, int] | None = None
    ) -> None:
        self.handler = parent_handler
        self.micro_batch_size = micro_batch_size
        self._parallelism: dict[str, int] = {}
        self.thread_groups: dict[str, list[WorkerThread]] = {step: [] for step in HANDLER_METHODS}
        self.queues: dict[str, queue.Queue] = {}
        self.thread_local_data = threading.local()
        self.terminate = threading.Event()
        self._rejects = _ThreadRejects()
        _adopt(parent_handler, self._rejects)
        self._create_queues()
        self.parallelism = parallelism or {}

    def __del__(self) -> None:
        # Only ask the threads to stop: they hold no reference to this object and end within _POLL_S.
        for group in getattr(self, "thread_groups", {}).values():
            for worker in group:
                worker.event.set()

    @property
    def parallelism(self) -> dict[str, int]:
        return copy(self._parallelism)

    @parallelism.setter
    def parallelism(self, parallelism: dict[str, int]) -> None:
        """Threads per step, e.g. ``{"preprocess": 2}``; the steps not named keep theirs."""
        for step, count in parallelism.items():
            if step not in HANDLER_METHODS:
                raise ValueError(f"micro-batching parallelism: {step!r} is not one of {HANDLER_METHODS}")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"micro-batching parallelism: {step} must be an integer >= 0, got {count!r}")
        self._parallelism.update(parallelism)
        self._update_threads()

    def shutdown(self) -> None:
        """Stop every thread (each finishes the micro-batch it holds)."""
        for group in getattr(self, "thread_groups", {}).values():
            for worker in group:
                worker.event.set()
            for worker in group:
                if worker.thread is not threading.current_thread():
                    worker.thread.join(timeout=5)
            group.clear()

    def _create_queues(self) -> None:
        # Each step's "out" queue is the next step's "in" queue.
        self.queues["preprocess_in"] = queue.Queue()
        for step, following in zip(HANDLER_METHODS, HANDLER_METHODS[1:], strict=False):
            self.queues[f"{step}_out"] = self.queues[f"{following}_in"] = queue.Queue()
        self.queues["postprocess_out"] = queue.Queue()

    def _update_threads(self) -> None:
        for step in HANDLER_METHODS:
            target = self._parallelism.get(step, 1)
            group = self.thread_groups[step]
            while len(group) < target:
                event = threading.Event()
                thread = threading.Thread(
                    target=_run_step,
                    args=(
                        weakref.ref(self),
                        step,
                        self.queues[f"{step}_in"],
                        self.queues[f"{step}_out"],
                        event,
                    ),
                    name=f"micro-batching-{step}-{len(group)}",
                    daemon=True,
                )
                thread.start()
                group.append(WorkerThread(event, thread))
            while len(group) > target:
                worker = group.pop()
                worker.event.set()
                worker.thread.join(timeout=5)

    def _run(self, step: str, item: _Item) -> None:
        self.thread_local_data.micro_batch_idx = item.idx
        if item.error is None:
            try:
                self._apply(step, item)
            except BaseException as exc:  # noqa: BLE001 - even sys.exit: the batch fails, the thread lives
                item.error = exc

    def _apply(self, step: str, item: _Item) -> None:
        """One step on one micro-batch; a micro-batch whose requests were all rejected skips the model."""
        handler = self.handler
        if step == "preprocess":
            if handler._rejected is not self._rejects:  # a later super().__init__() replaced it
                handler._rejected = self._rejects
            self._rejects.take()
            item.value = handler.preprocess(item.value)
            item.rejected = self._rejects.take()
        elif step == "inference":
            if not item.empty:
                item.value = handler.inference(item.value)
        else:
            answers = [] if item.empty else handler.postprocess(item.value)
            item.value = _merge(answers, item, type(handler).__name__)

    def handle(self, data: list[Any]) -> list[Any]:
        """The batch's answers: its micro-batches through the pipeline, put back in order."""
        idle = [step for step in HANDLER_METHODS if not self.thread_groups[step]]
        if idle and data:
            raise HandlerError(f"micro-batching: no threads for {', '.join(idle)} (parallelism 0)")
        size = max(1, int(self.micro_batch_size or 1))
        count = 0
        for idx, start in enumerate(range(0, len(data), size)):
            rows = data[start : start + size]
            self.queues["preprocess_in"].put_nowait(_Item(idx, len(rows), rows))
            count += 1
        done: list[_Item] = [self.queues["postprocess_out"].get() for _ in range(count)]
        for item in sorted(done, key=lambda i: i.idx):
            if item.error is not None:
                raise item.error
        return [answer for item in sorted(done, key=lambda i: i.idx) for answer in item.value]

    def get_micro_batch_idx(self) -> int | None:
        """The index of the micro-batch the calling step thread is working on."""
        return getattr(self.thread_local_data, "micro_batch_idx", None)

    def __call__(self, data: list[Any], context: Any) -> list[Any]:
        """The handler's entry point: describe and explain requests as TorchServe's, else ``handle``."""
        started = time.time()
        handler = self.handler
        handler.context = context
        if _asks(handler, "_is_describe") and callable(getattr(handler, "describe_handle", None)):
            output = [handler.describe_handle()]
        elif _asks(handler, "_is_explain") and callable(getattr(handler, "explain_handle", None)):
            output = handler.explain_handle(handler.preprocess(data), data)
        else:
            output = self.handle(data)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.time() - started) * 1000, 2), None, "ms")
        return output


def _run_step(
    owner: weakref.ref, step: str, inbox: queue.Queue, outbox: queue.Queue, event: threading.Event
) -> None:
    """A step thread's loop. It holds its MicroBatching only while it works on a micro-batch, so a
    handler dropped without ``shutdown()`` (``load_model`` in a script) is freed and its threads end."""
    while not event.is_set():
        try:
            item: _Item = inbox.get(timeout=_POLL_S)
        except queue.Empty:
            if owner() is None:
                return
            continue
        micro_batching = owner()
        if micro_batching is None:
            return
        micro_batching._run(step, item)
        del micro_batching
        outbox.put(item)


def _asks(handler: Any, method: str) -> bool:
    check = getattr(handler, method, None)
    return bool(check()) if callable(check) else False


def _merge(answers: Any, item: _Item, handler_name: str) -> list[Any]:
    """The micro-batch's answers with each rejected request's error at its own place."""
    if not item.rejected:
        return answers
    kept = [i for i in range(item.size) if i not in item.rejected]
    if not isinstance(answers, list) or len(answers) != len(kept):
        got = len(answers) if isinstance(answers, list) else type(answers).__name__
        raise HandlerError(f"{handler_name} answered {got} of the {len(kept)} requests it kept")
    merged = [item.rejected.get(i) for i in range(item.size)]
    for index, answer in zip(kept, answers, strict=True):
        merged[index] = answer
    return merged


def _adopt(handler: Any, rejects: _ThreadRejects) -> None:
    """Give the handler what its ``__init__`` sets when a subclass skipped ``super().__init__()``
    (TorchServe's micro-batching example does), and per-thread rejected requests."""
    for name, default in (("context", None), ("_tensor_counts", None), ("_input_dtypes", None)):
        if name not in vars(handler):
            setattr(handler, name, default)
    handler._rejected = rejects
