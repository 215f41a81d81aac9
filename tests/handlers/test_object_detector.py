"""The object_detector default handler with torchvision's Faster R-CNN (MobileNetV3, random weights)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from archiver.errors import ConfigError, HandlerInputError
from handlers.object_detector import ObjectDetector

LOW = {"handler": {"threshold": 0.05}}  # random weights score low; keep some boxes to compare


@pytest.fixture(scope="module")
def detector(kit, detector_dir):
    return kit.start(ObjectDetector, detector_dir, LOW)


@pytest.fixture(scope="module")
def scenes(kit, photos):
    """Images of three different sizes, small so the test stays quick."""
    sizes = [(160, 120), (160, 120), (120, 150), (200, 100), (160, 120), (120, 150), (200, 100), (160, 120)]
    return [
        kit.image_bytes(Image.open(io.BytesIO(p)).convert("RGB").resize(s), "PNG")
        for p, s in zip(photos, sizes, strict=True)
    ]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_a_batch_of_mixed_sizes_gets_the_same_answers_as_one_by_one(kit, detector, scenes, batch_size):
    handler, context = detector
    images = scenes[:batch_size]

    batched = kit.run_batch(handler, context, images)
    alone = [kit.run_batch(handler, context, [image])[0] for image in images]

    kit.same(batched, alone)
    assert any(batched), "expected some boxes above the low threshold"
    for detections in batched:
        for detection in detections:
            assert set(detection) - {"score"} <= {"background", "cat", "dog", "bird"}
            (label,) = set(detection) - {"score"}
            x1, y1, x2, y2 = detection[label]
            assert x1 <= x2 and y1 <= y2
            assert detection["score"] >= 0.05


def test_the_threshold_filters_detections(kit, detector_dir, scenes):
    strict, context = kit.start(ObjectDetector, detector_dir, {"handler": {"threshold": 0.99}})
    loose, _ = kit.start(ObjectDetector, detector_dir, {"handler": {"threshold": 0.0}})

    assert kit.run_batch(strict, context, scenes[:2]) == [[], []]
    assert len(kit.run_batch(loose, context, scenes[:1])[0]) > 0


def test_default_threshold_is_torchserves_half(kit, detector_dir):
    handler, _ = kit.start(ObjectDetector, detector_dir)
    assert handler.threshold == 0.5


def test_a_bad_image_in_the_batch_fails_alone(kit, detector, scenes):
    handler, context = detector

    answers = kit.run_batch(handler, context, [scenes[0], b"\x89PNG\r\n\x1a\n broken", scenes[2]])

    assert isinstance(answers[1], HandlerInputError)
    kit.same([answers[0], answers[2]], kit.run_batch(handler, context, [scenes[0], scenes[2]]))


def test_a_threshold_outside_zero_to_one_is_refused(kit, detector_dir):
    with pytest.raises(ConfigError, match="threshold"):
        kit.start(ObjectDetector, detector_dir, {"handler": {"threshold": 5}})
