"""Image and text decoding: every format and mode a user sends, and every broken payload refused cleanly."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from archiver.errors import HandlerInputError
from handlers.text import decode_text, tokenize
from handlers.vision import decode_image, imagenet_tensor, tensor_from_json

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def red_left_blue_right(width: int = 40, height: int = 20) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("JPEG", "CMYK"),
        ("PNG", "RGBA"),
        ("PNG", "LA"),
        ("PNG", "P"),
        ("PNG", "I;16"),
        ("WEBP", "RGB"),
        ("WEBP", "RGBA"),
        ("BMP", "RGB"),
        ("GIF", "P"),
        ("TIFF", "F"),
    ],
)
def test_every_format_and_mode_becomes_an_rgb_picture(fmt, mode):
    source = red_left_blue_right().convert(mode) if mode not in ("I;16", "F") else Image.new(mode, (40, 20))

    image = decode_image(encoded(source, fmt))

    assert image.mode == "RGB" and image.size == (40, 20)
    assert imagenet_tensor(image).shape == (3, 224, 224)


def test_transparent_pixels_become_white_not_whatever_they_hid():
    source = Image.new("RGBA", (4, 4), (10, 200, 30, 0))

    assert decode_image(encoded(source, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    payload = encoded(red_left_blue_right(40, 20), "JPEG", exif=exif.tobytes())

    image = decode_image(payload)

    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 2)), image.getpixel((10, 37))
    assert top[0] > 200 and top[2] < 60  # the red (left) half is on top after rotating clockwise
    assert bottom[2] > 200 and bottom[0] < 60


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge picture: a decompression bomb's calling card."""
    real = encoded(Image.new("L", (1, 1)), "PNG")
    ihdr_data = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr_data
    ihdr = struct.pack(">I", len(ihdr_data)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return real[:8] + ihdr + real[8 + 25 :]


def test_a_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(HandlerInputError, match="too large|over the limit"):
        decode_image(png_claiming(100_000, 100_000))


def test_the_pixel_limit_is_ours_to_set_and_to_lift():
    payload = encoded(Image.new("RGB", (200, 100)), "PNG")

    with pytest.raises(HandlerInputError, match="200x100 = 20000 pixels, over the limit of 10000"):
        decode_image(payload, max_pixels=10_000)
    assert decode_image(payload, max_pixels=None).size == (200, 100)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty body"),
        (b"plain text, not a picture", "not an image"),
        ("not base64 !!", "base64"),
        ({"image": "in JSON"}, "JSON dict"),
        ([1, 2, 3], "JSON list"),
    ],
)
def test_payloads_that_are_not_images_say_why(payload, reason):
    with pytest.raises(HandlerInputError, match=reason):
        decode_image(payload)


def test_a_truncated_image_is_refused_not_half_decoded(kitten_bytes):
    with pytest.raises(HandlerInputError, match="cannot be decoded"):
        decode_image(kitten_bytes[: len(kitten_bytes) // 2])


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_an_image_or_a_handler_input_error(payload):
    with contextlib.suppress(HandlerInputError):
        assert decode_image(payload).mode == "RGB"


@FUZZ
@given(st.sampled_from(["PNG", "GIF", "BMP", "WEBP", "JPEG"]), st.data())
def test_damaged_real_images_are_an_image_or_a_handler_input_error(fmt, data):
    payload = bytearray(encoded(red_left_blue_right(16, 16), fmt))
    for _ in range(data.draw(st.integers(1, 8))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(payload)))
    with contextlib.suppress(HandlerInputError):
        decode_image(bytes(payload[:cut]))


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_are_text_or_a_handler_input_error(payload):
    try:
        text = decode_text(payload)
    except HandlerInputError:
        return
    assert isinstance(text, str) and text.strip()
    assert all(isinstance(token, str) and token for token in tokenize(text))


@FUZZ
@given(st.text(max_size=300))
def test_any_text_tokenizes_to_lowercase_words_and_bigrams(text):
    tokens = tokenize(text)
    words = [t for t in tokens if " " not in t]
    assert len(tokens) == max(0, 2 * len(words) - 1)
    assert all(t == t.lower() for t in tokens)


def test_tokenize_matches_torchserves_cleaning():
    assert tokenize("<b>Don't</b> PANIC, it's Café time!") == [
        "do",
        "not",
        "panic",
        "it",
        "is",
        "cafe",
        "time",
        "do not",
        "not panic",
        "panic it",
        "it is",
        "is cafe",
        "cafe time",
    ]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=40,
)


@FUZZ
@given(st.lists(JSON_VALUES, max_size=4))
def test_any_json_list_is_an_image_tensor_or_a_handler_input_error(payload):
    try:
        tensor = tensor_from_json(payload)
    except HandlerInputError:
        return
    assert tensor.dim() == 3


def test_a_very_long_strip_is_not_blown_up_by_the_resize():
    strip = encoded(Image.new("RGB", (60_000, 1), (10, 20, 30)), "PNG")

    tensor = imagenet_tensor(decode_image(strip))

    assert tensor.shape == (3, 224, 224)


def torchserve_transform():
    """TorchServe's image_classifier transform, the reference our faster one must match."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )


# One level of 255 after normalizing by the smallest std (0.224). torch's antialiased uint8 resize
# rounds a few values of a photo one level away from PIL's; on random noise, rarely two.
ONE_LEVEL = 1 / (255 * 0.224) + 1e-5


def assert_like_torchserve(ours: torch.Tensor, reference: torch.Tensor, levels: int = 1) -> None:
    assert ours.shape == reference.shape and ours.dtype == reference.dtype and ours.is_contiguous()
    difference = (ours - reference).abs()
    assert difference.max().item() <= levels * ONE_LEVEL
    assert difference.mean().item() < 0.5 * ONE_LEVEL  # some values a level off, not a shifted picture


def test_the_strip_guard_leaves_ordinary_pictures_alone(kitten_bytes):
    torchserve = torchserve_transform()
    for size in [(451, 300), (1000, 260), (260, 1000)]:
        image = decode_image(kitten_bytes).resize(size)
        assert_like_torchserve(imagenet_tensor(image), torchserve(image))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 900), st.integers(1, 900), st.integers(0, 2**32 - 1))
def test_the_fast_transform_is_torchserves_within_two_levels_on_noise(width, height, seed):
    assume(max(width, height) <= 4 * min(width, height))  # longer strips are cut first, on purpose
    noise = torch.randint(
        0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    image = Image.fromarray(noise.numpy(), "RGB")  # noise: the hardest picture for a resize to agree on

    assert_like_torchserve(imagenet_tensor(image), torchserve_transform()(image), levels=2)


@pytest.mark.parametrize("size", [(4000, 3000), (256, 300), (224, 224), (100, 50), (1, 1)])
def test_big_small_and_exact_sizes_match_torchserve(kitten_bytes, size):
    image = decode_image(kitten_bytes).resize(size)

    assert_like_torchserve(imagenet_tensor(image), torchserve_transform()(image))


def test_pictures_torchvision_would_pad_still_go_through_torchvision(kitten_bytes):
    from torchvision.transforms import functional as F

    image = decode_image(kitten_bytes)  # a 200 resize leaves less than the 224 crop: torchvision pads
    expected = F.normalize(
        F.to_tensor(F.center_crop(F.resize(image, 200), 224)), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )

    assert torch.equal(imagenet_tensor(image, resize=200), expected)


def test_the_kittens_answer_is_the_one_torchserves_transform_gives(kitten_bytes):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    image = decode_image(kitten_bytes)

    with torch.no_grad():
        ours = model(imagenet_tensor(image).unsqueeze(0))[0]
        reference = model(torchserve_transform()(image).unsqueeze(0))[0]

    assert torch.equal(ours.topk(5).indices, reference.topk(5).indices)
    assert (ours - reference).abs().max() < 1e-3 * (reference.max() - reference.min())
    assert (ours.softmax(0) - reference.softmax(0)).abs().max() < 1e-5


def test_a_request_with_neither_body_nor_data_field_says_how_to_send_an_image():
    with pytest.raises(HandlerInputError, match=r"form field named 'data'.*curl -T FILE"):
        decode_image(None)


def big_photo(kitten_bytes: bytes, size: tuple[int, int] = (2400, 1800)) -> bytes:
    """A phone-sized JPEG: the kitten scaled up, with sensor-like noise so it is not unnaturally smooth."""
    picture = decode_image(kitten_bytes).resize(size, Image.BICUBIC)
    noise = torch.randint(-12, 13, (size[1], size[0], 3), generator=torch.Generator().manual_seed(1))
    pixels = (torch.from_numpy(np.array(picture)).to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)
    return encoded(Image.fromarray(pixels.numpy(), "RGB"), "JPEG", quality=90)


def test_a_big_jpeg_drafted_for_the_crop_gives_nearly_the_full_decodes_tensor(kitten_bytes):
    import torchvision

    photo = big_photo(kitten_bytes)
    full, drafted = decode_image(photo), decode_image(photo, draft=512)
    assert (full.size, drafted.size) == ((2400, 1800), (1200, 900))  # libjpeg's 1/2 scale, both sides >= 512

    reference, ours = torchserve_transform()(full), imagenet_tensor(drafted)
    levels = (ours - reference).abs() * 255 * 0.224
    assert levels.max() <= 3 and levels.mean() < 0.5
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    with torch.no_grad():
        logits, expected = model(ours.unsqueeze(0))[0], model(reference.unsqueeze(0))[0]
    assert torch.equal(logits.topk(5).indices, expected.topk(5).indices)
    assert (logits - expected).abs().max() < 2e-3 * (expected.max() - expected.min())


def test_draft_leaves_small_jpegs_other_formats_and_the_pixel_limit_alone(kitten_bytes):
    kitten = decode_image(kitten_bytes, draft=512)  # 451x300: no scale keeps both sides >= 512
    assert kitten.size == (451, 300) and kitten.tobytes() == decode_image(kitten_bytes).tobytes()
    png = encoded(Image.new("RGB", (2400, 1800), (10, 20, 30)), "PNG")
    assert decode_image(png, draft=512).size == (2400, 1800)
    with pytest.raises(HandlerInputError, match="2400x1800 = 4320000 pixels, over the limit of 1000000"):
        decode_image(big_photo(kitten_bytes), max_pixels=1_000_000, draft=512)


def test_only_the_default_transform_gets_drafted_pictures():
    from handlers.image_classifier import ImageClassifier
    from handlers.image_segmenter import ImageSegmenter
    from handlers.object_detector import ObjectDetector
    from handlers.vision import VisionHandler

    class OwnTransform(VisionHandler):
        image_processing = staticmethod(lambda image: torch.zeros(1, 28, 28))

    assert ImageClassifier()._draft() == ImageSegmenter()._draft() == 512
    assert ObjectDetector()._draft() is None  # its boxes are in the picture's own pixels
    assert OwnTransform()._draft() is None
