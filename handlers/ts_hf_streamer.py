"""TorchServe's ``ts.handler_utils.hf_batch_streamer.TextIteratorStreamerBatch``: one Hugging Face text
streamer per row of a batch, iterated together (needs ``transformers`` in the model's environment).

``generate(..., streamer=s)`` puts each step's tokens (one row per request); iterating ``s`` gives,
per step, ``[{"text": ...}, ...]`` for every request, and stops when any request's stream ends.
"""

from __future__ import annotations

from typing import Any

from transformers.generation.streamers import BaseStreamer, TextIteratorStreamer


class TextIteratorStreamerBatch(BaseStreamer):
    """A TextIteratorStreamer per row of the batch."""

    def __init__(
        self,
        tokenizer: Any,
        batch_size: int,
        skip_prompt: bool = False,
        timeout: float | None = None,
        **decode_kwargs: Any,
    ) -> None:
        self.batch_size = batch_size
        self.streamers = [
            TextIteratorStreamer(tokenizer, skip_prompt, timeout, **decode_kwargs) for _ in range(batch_size)
        ]
        self.streamer_iterators = [iter(streamer) for streamer in self.streamers]

    def put(self, value: Any) -> None:
        if value.shape[0] != self.batch_size:
            raise ValueError(
                f"TextIteratorStreamerBatch batch size is set to {self.batch_size} but got input tensor "
                f"of shape {value.shape}"
            )
        for index, streamer in enumerate(self.streamers):
            streamer.put(value[index : index + 1])

    def end(self) -> None:
        for streamer in self.streamers:
            streamer.end()

    def __iter__(self) -> TextIteratorStreamerBatch:
        return self

    def __next__(self) -> list[dict[str, str]]:
        values: list[dict[str, str] | None] = []
        for iterator in self.streamer_iterators:  # every stream advances, as in TorchServe
            try:
                values.append({"text": next(iterator)})
            except StopIteration:
                values.append(None)
        if None in values:
            raise StopIteration
        return values  # type: ignore[return-value]
