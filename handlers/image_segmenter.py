"""The ``image_segmenter`` default handler: per pixel ``[class, probability]``, or a PNG class mask.

For torchvision segmentation models (a dict with ``out`` of shape N×C×H×W; a plain tensor works too).
The default answer is TorchServe's: ``[H][W][2]`` lists of ``[class index, probability]`` for the
ImageNet-cropped 224×224 image, about 2 MB of JSON. A request with ``Accept: image/png`` gets the class
index of each pixel as an 8-bit grayscale PNG instead (``image/png``), a few kB that a person can open.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from handlers.vision import ImageNetTransform, VisionHandler

PNG = "image/png"


def mask_png(classes: torch.Tensor) -> bytes:
    """An H×W tensor of class indices as a PNG: 8-bit grayscale up to 256 classes, else 16-bit."""
    array = classes.to(torch.int32).cpu().numpy()
    if array.max(initial=0) < 256:
        image = Image.fromarray(array.astype("uint8"), mode="L")
    else:
        image = Image.fromarray(array.astype("uint16"), mode="I;16")
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


class ImageSegmenter(VisionHandler):
    """Softmax over classes; the most likely class of each pixel and its probability."""

    image_processing = ImageNetTransform()  # TorchServe's: Resize(256), CenterCrop(224), ToTensor, Normalize

    def __init__(self) -> None:
        super().__init__()
        self._wants_png: list[bool] = []

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        self._wants_png = [_accepts_png(context, i) for i in range(len(data))]
        return super().handle(data, context)

    def postprocess(self, data: Any) -> list[Any]:
        if isinstance(data, dict):
            data = data["out"]
        probs = torch.softmax(data.float(), dim=1)
        best = torch.max(probs, dim=1)
        kept = [i for i in range(len(self._wants_png)) if i not in self._rejected]
        if len(kept) != probs.shape[0]:  # postprocess called on its own, outside handle()
            kept, self._wants_png = list(range(probs.shape[0])), [False] * probs.shape[0]
        answers: list[Any] = []
        for row, index in enumerate(kept):
            if self._wants_png[index]:
                self.context.set_response_content_type(index, PNG)
                answers.append(mask_png(best.indices[row]))
            else:
                pairs = torch.stack([best.indices[row].to(best.values.dtype), best.values[row]], dim=2)
                answers.append(pairs.tolist())
        return answers


def _accepts_png(context: Any, index: int) -> bool:
    if context is None:
        return False
    accept = context.get_request_header(index, "Accept")
    return isinstance(accept, str) and PNG in accept.lower()
