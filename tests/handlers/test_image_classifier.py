"""The image_classifier default handler, called directly on real images with a small real CNN."""

from __future__ import annotations

import pytest

from archiver.errors import ConfigError, HandlerInputError
from handlers.image_classifier import ImageClassifier


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_a_batch_gets_the_same_answers_as_its_images_one_by_one(kit, classifier_dir, photos, batch_size):
    handler, context = kit.start(ImageClassifier, classifier_dir)
    images = photos[:batch_size]

    batched = kit.run_batch(handler, context, images)
    alone = [kit.run_batch(handler, context, [image])[0] for image in images]

    assert len(batched) == batch_size
    kit.same(batched, alone)
    for answer in batched:
        assert len(answer) == 5
        assert set(answer) <= set(kit.CLASS_NAMES)  # labels from the list form, not one character of it
        probs = list(answer.values())
        assert probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1.0 + 1e-6


def test_one_corrupt_image_fails_alone_and_the_rest_are_answered(kit, classifier_dir, photos):
    handler, context = kit.start(ImageClassifier, classifier_dir)
    truncated = photos[0][: len(photos[0]) // 3]
    batch = [photos[1], truncated, photos[2], b"this is not an image"]

    answers = kit.run_batch(handler, context, batch)

    assert isinstance(answers[1], HandlerInputError)
    assert "cannot be decoded" in str(answers[1])
    assert isinstance(answers[3], HandlerInputError)
    assert "not an image" in str(answers[3])
    kit.same(answers[0], kit.run_batch(handler, context, [photos[1]])[0])
    kit.same(answers[2], kit.run_batch(handler, context, [photos[2]])[0])


def test_a_batch_of_only_bad_images_is_all_errors_without_running_the_model(kit, classifier_dir):
    handler, context = kit.start(ImageClassifier, classifier_dir)

    answers = kit.run_batch(handler, context, [b"", b"GIF89a broken", {"json": "object"}])

    assert all(isinstance(a, HandlerInputError) for a in answers)
    assert "empty body" in str(answers[0])
    assert "JSON dict" in str(answers[2])


def test_topk_comes_from_model_config_and_is_capped_at_the_number_of_classes(kit, classifier_dir, photos):
    three, _ = kit.start(ImageClassifier, classifier_dir, {"handler": {"topk": 3}})
    many, context = kit.start(ImageClassifier, classifier_dir, {"handler": {"topk": 50}})

    assert len(kit.run_batch(three, context, [photos[0]])[0]) == 3
    everything = kit.run_batch(many, context, [photos[0]])[0]
    assert sorted(everything) == sorted(kit.CLASS_NAMES)
    assert sum(everything.values()) == pytest.approx(1.0, abs=1e-5)


def test_a_bad_topk_is_refused_at_initialize(kit, classifier_dir):
    with pytest.raises(ConfigError, match="handler.topk"):
        kit.start(ImageClassifier, classifier_dir, {"handler": {"topk": "five"}})


def test_base64_text_is_decoded_as_an_image_like_torchserve(kit, classifier_dir, photos):
    import base64

    handler, context = kit.start(ImageClassifier, classifier_dir)

    as_text = kit.run_batch(handler, context, [base64.b64encode(photos[0]).decode()])[0]

    kit.same(as_text, kit.run_batch(handler, context, [photos[0]])[0])


def test_a_decompression_bomb_in_a_batch_fails_alone(kit, classifier_dir, photos):
    import struct
    import zlib

    from PIL import Image

    tiny = kit.image_bytes(Image.new("RGB", (1, 1)), "PNG")
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    # the tiny PNG with its header swapped for one claiming 3.6 gigapixels
    bomb = tiny[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + tiny[33:]
    handler, context = kit.start(ImageClassifier, classifier_dir)

    good, refused = kit.run_batch(handler, context, [photos[0], bomb])

    assert isinstance(refused, HandlerInputError)
    assert "too large" in str(refused) or "over the limit" in str(refused)
    kit.same(good, kit.run_batch(handler, context, [photos[0]])[0])


def test_a_subclass_may_set_topk_as_in_torchserve_and_model_config_still_wins(kit, classifier_dir, photos):
    class TopTwo(ImageClassifier):
        topk = 2

    two, context = kit.start(TopTwo, classifier_dir)
    three, _ = kit.start(TopTwo, classifier_dir, {"handler": {"topk": 3}})

    assert len(kit.run_batch(two, context, [photos[0]])[0]) == 2
    assert len(kit.run_batch(three, context, [photos[0]])[0]) == 3


def test_an_image_sent_as_a_json_tensor_is_answered_like_the_picture(kit, classifier_dir, photos):
    from handlers.vision import decode_image, imagenet_tensor

    handler, context = kit.start(ImageClassifier, classifier_dir)
    as_json = imagenet_tensor(decode_image(photos[0])).tolist()

    from_json, wrong_shape, ragged = kit.run_batch(
        handler, context, [as_json, [[[0.0] * 5] * 5] * 3, [[1], [2, 3]]]
    )

    kit.same(from_json, kit.run_batch(handler, context, [photos[0]])[0])
    assert isinstance(wrong_shape, HandlerInputError) and "shape [3, 224, 224]" in str(wrong_shape)
    assert isinstance(ragged, HandlerInputError)
