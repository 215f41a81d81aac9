"""Images in: decode a request's payload with clear errors and a pixel limit, and the shared transforms.

Every failure to make an RGB picture out of a payload (not an image, truncated, too many pixels, wrong
type) is a HandlerInputError naming the reason, so a handler can reject that one request and answer
the rest of its batch. Unlike TorchServe, images are converted to RGB (grayscale, palette, RGBA and
CMYK pictures work), EXIF orientation is applied, and the pixel limit is checked here, per handler,
before any pixel is decoded (the loader lifts PIL's process-wide limit only for a model loaded with
``limit_max_image_pixels=False``, as TorchServe does). For the default ImageNet transform a big JPEG
is decoded at a reduced scale still twice the resize (``draft``), and the transform itself takes a
faster route; both stay within a level or two of 255 of TorchServe's tensor.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import functional as F

from archiver.errors import HandlerInputError, reason
from handlers.base import BaseHandler, payload_of
from handlers.explain import integrated_gradients

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL's own default (about 89.5 megapixels, a 0.25 GB RGB buffer): the decompression-bomb guard.
DEFAULT_MAX_PIXELS = 89_478_485
MAX_ASPECT = 4


def decode_image(
    payload: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    keep_grayscale: bool = False,
    draft: int | None = None,
) -> Image.Image:
    """An RGB PIL image from raw bytes (or base64 text); HandlerInputError for anything else.

    ``max_pixels`` None lifts the limit (TorchServe's ``limit_max_image_pixels=false``).
    ``keep_grayscale`` returns grayscale pictures as mode "L", for single-channel models (MNIST).
    ``draft`` lets a big JPEG be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's own, during decoding)
    as long as both sides stay at least ``draft`` pixels: a 12-megapixel photo headed for a 224×224
    crop then decodes in a fraction of the time. The pixel limit applies to the full size regardless.
    """
    if isinstance(payload, str):
        try:
            payload = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HandlerInputError("expected an image; text payloads must be base64-encoded images") from exc
    if payload is None:
        raise HandlerInputError(
            "expected an image as the body or a form field named 'data', got neither "
            "(send a file with curl -T FILE or -F data=@FILE)"
        )
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise HandlerInputError(f"expected an image, got a JSON {type(payload).__name__}")
    if len(payload) == 0:
        raise HandlerInputError("expected an image, got an empty body")
    try:
        image = Image.open(io.BytesIO(payload))
    except Image.DecompressionBombError as exc:
        raise HandlerInputError(f"image is too large: {exc}") from exc
    except Exception as exc:
        raise HandlerInputError("not an image PIL can read (JPEG, PNG, WebP, BMP, GIF, ...)") from exc
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise HandlerInputError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    if width == 0 or height == 0:
        raise HandlerInputError("image has no pixels")
    try:
        if draft is not None and image.format == "JPEG":
            image.draft(None, (draft, draft))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright picture
        return _to_rgb(image, keep_grayscale)
    except Exception as exc:
        raise HandlerInputError(f"image cannot be decoded ({reason(exc)})") from exc


def tensor_from_json(payload: list, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """An image sent as a JSON list of numbers (C×H×W, already transformed), TorchServe's third input form."""
    try:
        tensor = torch.as_tensor(payload, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise HandlerInputError(
            "a JSON image must be a nested list of numbers (channels × height × width)"
        ) from exc
    if tensor.dim() != 3 or 0 in tensor.shape:
        raise HandlerInputError(
            f"a JSON image must have 3 dimensions (C×H×W), got shape {list(tensor.shape)}"
        )
    if shape is not None and tuple(tensor.shape) != shape:
        raise HandlerInputError(f"a JSON image must have shape {list(shape)}, got {list(tensor.shape)}")
    return tensor


def _to_rgb(image: Image.Image, keep_grayscale: bool = False) -> Image.Image:
    if image.mode == "RGB" or (keep_grayscale and image.mode == "L"):
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white rather than dropping alpha, which would reveal whatever the hidden pixels hold.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float grayscale: scale to 8 bits first; convert("RGB") would clip.
        values = np.asarray(image, dtype=np.float32)
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
        if keep_grayscale:
            return image
    return image.convert("RGB")


def imagenet_tensor(image: Image.Image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """TorchServe's classifier transform: Resize(256), CenterCrop(224), ToTensor, ImageNet Normalize.

    A very long strip is first cut to 4:1 around its centre: Resize(256) scales the short side, so a
    1×50,000 picture (well under the pixel limit) would otherwise become 256×12.8 million pixels on its
    way to a 224×224 crop. The cut keeps far more than the crop needs, so answers do not change.

    RGB pictures take a faster route with the same result (``_fast_imagenet_tensor``); anything else
    (or a crop larger than the resized picture, which torchvision pads) goes through torchvision itself.
    """
    width, height = image.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        keep = MAX_ASPECT * min(width, height)
        image = F.center_crop(image, [height, keep] if width > height else [keep, width])
    if image.mode == "RGB":
        fast = _fast_imagenet_tensor(image, resize, crop)
        if fast is not None:
            return fast
    image = F.center_crop(F.resize(image, resize), crop)
    return F.normalize(F.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


# Normalize((x / 255 - mean) / std) as one multiply and one add per value: x * _SCALE + _SHIFT.
_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(3, 1, 1)
_SHIFT = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


def _fast_imagenet_tensor(image: Image.Image, resize: int, crop: int) -> torch.Tensor | None:
    """The same transform as torchvision's, 2-4× faster per picture; None where it does not apply.

    The resize is most of the reference's time. Up to twice the target size (the usual upload, and
    any JPEG ``decode_image`` drafted) torch's uint8 antialiased bilinear kernel does it on the
    channels-last pixels, about 4× faster than PIL and written to match PIL's (a few values one level
    of 255 away). Above that torch's kernel falls behind PIL's, so PIL resizes only the part of the
    picture the crop keeps (``box``: the same filter at the same positions, 2-3× less work). Either
    way ToTensor + Normalize become one multiply-add from the uint8 crop. Sizes and the crop's position
    follow torchvision's rules (short side to ``resize``, long side truncated; offsets rounded).
    """
    width, height = image.size
    if width <= height:
        new_width, new_height = resize, int(resize * height / width)
    else:
        new_width, new_height = int(resize * width / height), resize
    if crop > new_width or crop > new_height:
        return None  # torchvision pads such a crop; leave that rare case to it
    top = int(round((new_height - crop) / 2.0))
    left = int(round((new_width - crop) / 2.0))
    if min(width, height) > 2 * resize:
        x_scale, y_scale = width / new_width, height / new_height
        box = (left * x_scale, top * y_scale, (left + crop) * x_scale, (top + crop) * y_scale)
        kept_image = image.resize((crop, crop), Image.Resampling.BILINEAR, box=box)
        kept = torch.frombuffer(bytearray(kept_image.tobytes()), dtype=torch.uint8)
        kept = kept.view(crop, crop, 3).permute(2, 0, 1)
    else:
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(1, height, width, 3).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
        if (new_width, new_height) != (width, height):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(new_height, new_width), mode="bilinear", antialias=True, align_corners=False
            )
        kept = pixels[0, :, top : top + crop, left : left + crop]
    out = torch.mul(kept, _SCALE, out=torch.empty(kept.shape))  # a contiguous C×H×W float tensor
    return out.add_(_SHIFT)


class ImageNetTransform(transforms.Compose):
    """TorchServe's default transform as its ``image_processing`` (Resize(256), CenterCrop(224),
    ToTensor, ImageNet Normalize): a real ``Compose`` whose ``transforms`` list subclasses may read,
    that takes ``imagenet_tensor``'s faster route, and any picture mode (RGB made first) where
    TorchServe's fails on a grayscale or RGBA one."""

    handler_default = True  # VisionHandler decodes for it as for no transform (RGB, JPEG draft)

    def __init__(self, resize: int = 256, crop: int = 224) -> None:
        super().__init__(
            [
                transforms.Resize(resize),
                transforms.CenterCrop(crop),
                transforms.ToTensor(),
                transforms.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
            ]
        )
        self.resize, self.crop = resize, crop

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return imagenet_tensor(_to_rgb(image), self.resize, self.crop)
        return super().__call__(image)


class ToTensorTransform(transforms.Compose):
    """TorchServe's object detector transform, ``Compose([ToTensor()])``, on an RGB picture."""

    handler_default = True

    def __init__(self) -> None:
        super().__init__([transforms.ToTensor()])

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = _to_rgb(image)
        return super().__call__(image)


def _is_default(transform: Any) -> bool:
    return transform is None or getattr(transform, "handler_default", False)


class VisionHandler(BaseHandler):
    """Decode each request's image on its own; reject the ones that fail, batch the rest.

    As in TorchServe, a subclass may set ``image_processing`` to its own transform (PIL image to
    tensor); it then gets grayscale pictures as grayscale (TorchServe's MNIST example relies on it)
    and every other picture as RGB.
    """

    image_processing: Callable[[Image.Image], torch.Tensor] | None = None
    # The shape a JSON-list image must have (None: any C×H×W); the default transform makes 3×224×224.
    json_image_shape: tuple[int, ...] | None = (3, 224, 224)
    # Also a class default: TorchServe's micro-batching example skips super().__init__().
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __init__(self) -> None:
        super().__init__()
        self.max_pixels: int | None = DEFAULT_MAX_PIXELS

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        if not context.system_properties.get("limit_max_image_pixels", True):
            self.max_pixels = None

    def get_insights(self, tensor_data: torch.Tensor, _: Any, target: Any = 0) -> list:
        """TorchServe's: Captum's IntegratedGradients attributions of each image for class ``target``."""
        return integrated_gradients(self.model, tensor_data, target)

    def image_to_tensor(self, image: Image.Image) -> torch.Tensor:
        """One decoded image to the model's input tensor (C, H, W): ``image_processing``, else ImageNet's."""
        if self.image_processing is not None:
            return self.image_processing(image)
        return imagenet_tensor(image)

    def _draft(self) -> int | None:
        """Twice the default transform's resize, for JPEG draft decoding; None for any other transform.

        Twice, so the antialiased resize still averages at least 2×2 decoded pixels into each output
        one: the tensor stays within a level or two of 255 of a full decode's. A subclass with its own
        transform (``image_processing``, ``image_to_tensor``: the object detector's boxes are in the
        picture's own pixels) always gets the full picture.
        """
        default = (
            isinstance(self.image_processing, ImageNetTransform) or self.image_processing is None
        ) and type(self).image_to_tensor is VisionHandler.image_to_tensor
        return 2 * getattr(self.image_processing, "resize", 256) if default else None

    def decode_rows(self, data: list[Any]) -> list[tuple[int, torch.Tensor]]:
        """(index, tensor) for each request whose image decodes; the others are rejected."""
        decoded = []
        gray = not _is_default(self.image_processing)
        for index, row in enumerate(data):
            payload = payload_of(row)
            try:
                if isinstance(payload, list) and payload and isinstance(payload[0], (str, bytes, bytearray)):
                    # several encoded images in one request (a v2 BYTES input of shape [N]): one per request
                    raise HandlerInputError(
                        f"expected one image per request, got {len(payload)} (a BYTES input of shape [1])"
                    )
                if isinstance(payload, list):
                    shape = self.json_image_shape if _is_default(self.image_processing) else None
                    decoded.append((index, tensor_from_json(payload, shape)))
                    continue
                image = decode_image(
                    payload, max_pixels=self.max_pixels, keep_grayscale=gray, draft=self._draft()
                )
                decoded.append((index, self.image_to_tensor(image)))
            except HandlerInputError as exc:
                self.reject(index, exc)
        return decoded

    def preprocess(self, data: list[Any]) -> torch.Tensor | None:
        tensors = [tensor for _, tensor in self.decode_rows(data)]
        if not tensors:
            return None
        return torch.stack(tensors).to(self.device)
