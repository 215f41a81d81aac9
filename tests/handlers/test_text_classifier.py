"""The text_classifier default handler with a bag-of-bigrams model trained in the test session."""

from __future__ import annotations

import random

import pytest

from archiver.errors import HandlerError, HandlerInputError
from handlers.text_classifier import TextClassifier

SENTENCES = {
    "sports": "The striker won the match for the team, and the coach was happy!",
    "weather": "Forecast: a cold storm with snow and strong wind today.",
    "cooking": "This recipe needs butter, flour and garlic; bake it in the oven.",
}


def test_it_answers_right_with_probabilities_over_all_classes(kit, text_dir):
    handler, context = kit.start(TextClassifier, text_dir)

    answers = kit.run_batch(handler, context, [s.encode() for s in SENTENCES.values()])

    for topic, answer in zip(SENTENCES, answers, strict=True):
        assert set(answer) == {"sports", "weather", "cooking"}
        assert max(answer, key=answer.get) == topic
        assert sum(answer.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_a_batch_gets_the_same_answers_as_one_by_one(kit, text_dir, batch_size):
    handler, context = kit.start(TextClassifier, text_dir)
    rng = random.Random(batch_size)
    texts = [kit.topic_sentence(rng, rng.choice(list(SENTENCES))) for _ in range(batch_size)]

    batched = kit.run_batch(handler, context, [t.encode() for t in texts])
    alone = [kit.run_batch(handler, context, [t])[0] for t in texts]

    kit.same(batched, alone)


def test_bad_text_fails_alone(kit, text_dir):
    handler, context = kit.start(TextClassifier, text_dir)

    answers = kit.run_batch(handler, context, [b"\xff\xfe caf\xe9", SENTENCES["sports"], b"   ", {"a": 1}])

    assert isinstance(answers[0], HandlerInputError) and "UTF-8" in str(answers[0])
    assert max(answers[1], key=answers[1].get) == "sports"
    assert isinstance(answers[2], HandlerInputError) and "empty" in str(answers[2])
    assert isinstance(answers[3], HandlerInputError)


def test_unknown_words_and_markup_do_not_break_it(kit, text_dir):
    handler, context = kit.start(TextClassifier, text_dir)

    (answer,) = kit.run_batch(handler, context, ["<p>Zyxx qwerty</p> — naïve café, won't it SNOW?"])

    assert set(answer) == {"sports", "weather", "cooking"}


def test_an_archive_without_vocab_json_is_refused_at_initialize(kit, text_dir, tmp_path):
    folder = kit.write_model_dir(
        tmp_path / "novocab",
        handler="text_classifier",
        serialized_file="model.pt",
        files={"model.pt": (text_dir / "model.pt").read_bytes()},
    )
    with pytest.raises(HandlerError, match="vocab.json"):
        kit.start(TextClassifier, folder)
