"""The ``image_classifier`` default handler: images in, the top-k ``{label: probability}`` per image out.

Same answer shape as TorchServe's (``{"tabby": 0.47, "tiger_cat": 0.46, ...}``), batched, with k taken
from model-config.yaml (``handler: {topk: 3}``, default 5) and capped at the number of classes, where
TorchServe fails on models with fewer than five.
"""

from __future__ import annotations

from typing import Any

import torch

from archiver.errors import ConfigError
from handlers.labels import label_for
from handlers.vision import ImageNetTransform, VisionHandler

DEFAULT_TOPK = 5


class ImageClassifier(VisionHandler):
    """Softmax over the model's logits, then the k most likely classes of each image."""

    topk = DEFAULT_TOPK  # a subclass may change it, as in TorchServe; model-config.yaml wins
    # TorchServe's default transform (Resize(256), CenterCrop(224), ToTensor, Normalize), which its
    # subclasses call themselves; a subclass may replace it.
    image_processing = ImageNetTransform()

    def set_max_result_classes(self, topk: int) -> None:
        self.topk = topk

    def get_max_result_classes(self) -> int:
        return self.topk

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        topk = self.handler_config().get("topk", self.topk)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"handler.topk in model-config.yaml must be an integer >= 1, got {topk!r}")
        self.topk = topk

    def postprocess(self, data: torch.Tensor) -> list[dict[str, float]]:
        if isinstance(data, (tuple, list)):  # some models return (logits, aux)
            data = data[0]
        probs = torch.softmax(data.float(), dim=1)
        k = min(self.topk, probs.shape[1])
        top_probs, top_classes = torch.topk(probs, k, dim=1)
        return [
            {label_for(self.mapping, c): p for c, p in zip(classes, row, strict=True)}
            for classes, row in zip(top_classes.tolist(), top_probs.tolist(), strict=True)
        ]
