"""Caption parsing, one-attribute distractors, and the object / multiple-choice scores."""

import pytest

from diva_lightning.backbones.tokenizers import build_word_tokenizer
from diva_lightning.data.shapes import ShapesWorld
from diva_lightning.evaluation.shapes.captions import DISTRACTOR_KINDS, distractors, parse_caption
from diva_lightning.evaluation.shapes.scores import (
    match_objects,
    multiple_choice_scores,
    object_scores,
)

WORLD = ShapesWorld(seed=11)
OBJECTS = [WORLD.objects(i) for i in range(150)]
CAPTIONS = [WORLD.describe(o) for o in OBJECTS]


def parsed_scores(captions):
    return object_scores([parse_caption(c, WORLD) for c in captions], OBJECTS[: len(captions)])


def test_true_captions_score_perfectly():
    s = parsed_scores(CAPTIONS)
    assert s["exact"] == 1.0 and s["score"] == 1.0


def test_decoded_tokenizer_text_still_parses():
    tokenizer = build_word_tokenizer()
    decoded = [tokenizer.decode(tokenizer(c).input_ids) for c in CAPTIONS]
    assert " ," in decoded[0] or " ." in decoded[0]  # the word tokenizer spaces punctuation
    assert parsed_scores(decoded)["exact"] == 1.0


def test_text_after_the_first_sentence_is_ignored():
    objs = parse_caption(CAPTIONS[0] + " a red circle at the center.", WORLD)
    assert len(objs) == len(OBJECTS[0])


def test_wrong_colour_words_hit_colour_only():
    swap = {c: WORLD.colours[(i + 1) % len(WORLD.colours)] for i, c in enumerate(WORLD.colours)}
    wrong = [" ".join(swap.get(w, w) for w in c.split(" ")) for c in CAPTIONS]
    s = parsed_scores(wrong)
    assert s["colour"] == 0.0 and s["shape"] == 1.0 and s["position"] == 1.0 and s["count"] == 1.0


def test_dropped_objects_lower_count_and_position():
    shortened = [
        WORLD.describe(o[:-1]) if len(o) > 1 else c for o, c in zip(OBJECTS, CAPTIONS, strict=True)
    ]
    s = parsed_scores(shortened)
    multi = sum(len(o) > 1 for o in OBJECTS)
    assert s["count"] == pytest.approx(1 - multi / len(OBJECTS))
    assert s["position"] < 1.0 and s["colour"] == s["position"]


def test_garbage_and_unknown_words():
    assert parse_caption("circle circle red the the", WORLD) == []
    (obj,) = parse_caption("a magenta blob at the top left.", WORLD)
    assert obj["colour"] is None and obj["shape"] is None and obj["cell"] == [0, 0]
    s = parsed_scores(["nothing here"] * 10)
    assert s["score"] == 0.0


@pytest.mark.parametrize("index", range(40))
def test_each_distractor_changes_exactly_one_attribute(index):
    truth = OBJECTS[index]
    options = distractors(truth, WORLD, seed=index)
    assert set(options) == set(DISTRACTOR_KINDS)
    assert len(set(options.values()) | {CAPTIONS[index]}) == 5  # all different
    for kind, caption in options.items():
        got = parse_caption(caption, WORLD)
        hits = match_objects(got, truth)
        n = len(truth)
        if kind == "count":
            assert abs(len(got) - n) == 1
        elif kind == "position":
            assert len(got) == n and hits["position"] == n - 1
        else:
            other = "shape" if kind == "colour" else "colour"
            assert hits["position"] == n and hits[other] == n and hits[kind] == n - 1


def test_distractors_are_seeded():
    assert distractors(OBJECTS[3], WORLD, 5) == distractors(OBJECTS[3], WORLD, 5)
    many = {tuple(distractors(OBJECTS[3], WORLD, s).values()) for s in range(10)}
    assert len(many) > 1


def test_multiple_choice_scores_known_answer():
    true = [0.0, -1.0, -5.0]
    other = [
        {"colour": -1.0, "shape": -2.0},
        {"colour": -0.5, "shape": -3.0},
        {"colour": -9, "shape": -9},
    ]
    s = multiple_choice_scores(true, other)
    assert s["mc_accuracy"] == pytest.approx(2 / 3)
    assert s["mc_colour"] == pytest.approx(2 / 3) and s["mc_shape"] == 1.0
    with pytest.raises(ValueError):
        multiple_choice_scores([0.0], [])


def test_object_scores_known_answer():
    truth = [
        [
            {"shape": "circle", "colour": "red", "cell": [0, 0]},
            {"shape": "square", "colour": "blue", "cell": [1, 1]},
        ]
    ]
    guess = [[{"shape": "circle", "colour": "blue", "cell": [0, 0]}]]  # one found, wrong colour
    s = object_scores(guess, truth)
    assert s["position"] == 0.5 and s["colour"] == 0.0 and s["shape"] == 0.5
    assert s["count"] == 0.0 and s["exact"] == 0.0 and s["score"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="predictions"):
        object_scores(guess * 2, truth * 3)
