"""The image_segmenter default handler with torchvision's LR-ASPP (MobileNetV3, random weights)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from archiver.errors import HandlerInputError
from handlers.image_segmenter import ImageSegmenter


@pytest.fixture(scope="module")
def segmenter(kit, segmenter_dir):
    return kit.start(ImageSegmenter, segmenter_dir)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_a_batch_gets_torchserves_per_pixel_answer_same_as_one_by_one(kit, segmenter, photos, batch_size):
    handler, context = segmenter
    images = photos[:batch_size]

    batched = kit.run_batch(handler, context, images)
    alone = [kit.run_batch(handler, context, [image])[0] for image in images]

    kit.same(batched, alone)
    for answer in batched:
        assert len(answer) == 224 and len(answer[0]) == 224  # [H][W][2] of the 224 crop
        cls, prob = answer[100][100]
        assert cls in (0.0, 1.0, 2.0) and 1 / 3 <= prob <= 1.0


def test_accept_image_png_gets_a_class_mask_that_matches_the_json_answer(kit, segmenter, photos):
    handler, context = segmenter
    headers = [{"Accept": "image/png"}, {}, {"accept": "image/png, application/json;q=0.5"}]

    answers = kit.run_batch(handler, context, photos[:3], headers)

    assert context.get_response_content_type(0) == "image/png"
    assert context.get_response_content_type(1) is None
    assert context.get_response_content_type(2) == "image/png"
    mask = Image.open(io.BytesIO(answers[0]))
    assert mask.format == "PNG" and mask.mode == "L" and mask.size == (224, 224)
    json_answer = kit.run_batch(handler, context, [photos[0]])[0]
    assert [[int(c) for c, _ in row] for row in json_answer] == [
        [mask.getpixel((x, y)) for x in range(224)] for y in range(224)
    ]
    assert len(answers[0]) < len(str(json_answer)) / 20


def test_a_bad_image_fails_alone_and_content_types_stay_with_their_requests(kit, segmenter, photos):
    handler, context = segmenter

    answers = kit.run_batch(handler, context, [b"junk", photos[0]], [{}, {"Accept": "image/png"}])

    assert isinstance(answers[0], HandlerInputError)
    assert context.get_response_content_type(1) == "image/png"
    assert Image.open(io.BytesIO(answers[1])).size == (224, 224)
