"""The ``object_detector`` default handler: images in, ``[{label: [x1, y1, x2, y2], "score": s}, ...]`` out.

For torchvision detection models (a list of image tensors in, a dict of ``boxes``/``labels``/``scores``
per image out), with TorchServe's answer shape and its 0.5 score threshold, configurable in
model-config.yaml (``handler: {threshold: 0.3}``). Images of different sizes share a batch: they are
grouped by size, so each group is one forward pass and no image is padded to fit another, which keeps
every image's answer identical to the one it gets alone.
"""

from __future__ import annotations

from typing import Any

import torch

from archiver.errors import ConfigError
from handlers.labels import label_for
from handlers.vision import ToTensorTransform, VisionHandler

DEFAULT_THRESHOLD = 0.5


class ObjectDetector(VisionHandler):
    """Detections above the threshold for each image, in the model's order (highest score first)."""

    threshold = DEFAULT_THRESHOLD  # a subclass may change it, as in TorchServe; model-config.yaml wins
    json_image_shape = None  # images of any size
    image_processing = ToTensorTransform()  # TorchServe's Compose([ToTensor()]); a subclass may replace it

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        threshold = self.handler_config().get("threshold", self.threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ConfigError(
                f"handler.threshold in model-config.yaml must be between 0 and 1, got {threshold!r}"
            )
        self.threshold = float(threshold)

    def preprocess(self, data: list[Any]) -> list[torch.Tensor] | None:
        tensors = [tensor.to(self.device) for _, tensor in self.decode_rows(data)]
        return tensors or None

    def inference(self, data: list[torch.Tensor], *args: Any, **kwargs: Any) -> list[dict[str, torch.Tensor]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for position, tensor in enumerate(data):
            groups.setdefault(tuple(tensor.shape), []).append(position)
        results: list[Any] = [None] * len(data)
        with torch.inference_mode():
            for positions in groups.values():
                output = self.model([data[p] for p in positions], *args, **kwargs)
                if (
                    isinstance(output, tuple) and len(output) == 2
                ):  # scripted models return (losses, detections)
                    output = output[1]
                for position, detections in zip(positions, output, strict=True):
                    results[position] = detections
        return results

    def postprocess(self, data: list[dict[str, torch.Tensor]]) -> list[list[dict[str, Any]]]:
        answers = []
        for detections in data:
            keep = detections["scores"] >= self.threshold
            boxes = detections["boxes"][keep].tolist()
            labels = detections["labels"][keep].tolist()
            scores = detections["scores"][keep].tolist()
            answers.append(
                [
                    {label_for(self.mapping, int(label)): box, "score": score}
                    for box, label, score in zip(boxes, labels, scores, strict=True)
                ]
            )
        return answers
