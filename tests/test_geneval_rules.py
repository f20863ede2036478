"""GenEval rule engine (SPEC section 6): table-driven checks of thresholds,
strict score credits, GenEval correctness, positions, colours and parsing."""

import json
from pathlib import Path

import numpy as np
import pytest

from advantage_weighted_matching.rewards.geneval_rules import (
    TAGS,
    DetectedObject,
    ExcludeClause,
    GenevalPrompt,
    IncludeClause,
    failed_geneval_fields,
    geneval_fields,
    parse_metadata,
    relative_position,
    score_prompt,
    select_detections,
)

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


class ColourTable:
    """Colour classifier stand-in: crop_id -> colour, recording every call."""

    def __init__(self, colours):
        self.colours = colours
        self.calls = []

    def __call__(self, class_name, objects):
        self.calls.append((class_name, [obj.crop_id for obj in objects]))
        return [self.colours[obj.crop_id] for obj in objects]


def det(score, box, crop_id=None):
    return (score, box, crop_id)


# Boxes on a 100 x 100 canvas.
LEFT = (0, 40, 20, 60)
RIGHT = (80, 40, 100, 60)
TOP = (40, 0, 60, 20)
BOTTOM = (40, 80, 60, 100)
CENTRE = (40, 40, 60, 60)

ONE_DOG = {"tag": "single_object", "prompt": "a photo of a dog", "include": [{"class": "dog", "count": 1}]}
DOG_AND_CAT = {
    "tag": "two_object",
    "prompt": "a photo of a dog and a cat",
    "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
}
THREE_APPLES = {
    "tag": "counting",
    "prompt": "a photo of three apples",
    "include": [{"class": "apple", "count": 3}],
    "exclude": [{"class": "apple", "count": 4}],
}
RED_CAR = {"tag": "colors", "prompt": "a photo of a red car", "include": [{"class": "car", "count": 1, "color": "red"}]}
PINK_BAG_BLACK_SCISSORS = {
    "tag": "color_attr",
    "prompt": "a photo of a pink handbag and a black scissors",
    "include": [{"class": "handbag", "count": 1, "color": "pink"}, {"class": "scissors", "count": 1, "color": "black"}],
}
CAT_LEFT_OF_DOG = {
    "tag": "position",
    "prompt": "a photo of a cat left of a dog",
    "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
}
TWO_RED_CARS = {"tag": "counting", "prompt": "two red cars", "include": [{"class": "car", "count": 2, "color": "red"}]}
CAT_ABOVE_RED_DOG = {
    "tag": "position",
    "prompt": "a cat above a red dog",
    "include": [{"class": "dog", "count": 1, "color": "red"}, {"class": "cat", "count": 1, "position": ["above", 0]}],
}

COLOURS = {"r1": "red", "r2": "red", "b1": "blue", "p1": "pink", "k1": "black", "w1": "white"}

# (name, metadata, candidates, expected strict score, strict_correct, GenEval correct)
CASES = [
    ("single present", ONE_DOG, {"dog": [det(0.8, CENTRE)]}, 1.0, True, True),
    ("single below 0.3", ONE_DOG, {"dog": [det(0.25, CENTRE)]}, 0.0, False, False),
    ("single at exactly 0.3 is dropped", ONE_DOG, {"dog": [det(0.3, CENTRE)]}, 0.0, False, False),
    # strict counts all kept objects: 2 dogs for 1 -> credit 1 - |1 - 2| / 1 = 0; GenEval needs >= 1
    ("single two found", ONE_DOG, {"dog": [det(0.8, LEFT), det(0.7, RIGHT)]}, 0.0, False, True),
    ("single wrong class", ONE_DOG, {"cat": [det(0.99, CENTRE)]}, 0.0, False, False),
    ("two present", DOG_AND_CAT, {"dog": [det(0.5, LEFT)], "cat": [det(0.6, RIGHT)]}, 1.0, True, True),
    ("two one missing", DOG_AND_CAT, {"dog": [det(0.5, LEFT)]}, 0.5, False, False),
    # counting threshold 0.9: the 0.85 and 0.9 apples are not kept
    (
        "count three of five candidates",
        THREE_APPLES,
        {"apple": [det(0.85, LEFT), det(0.95, LEFT), det(0.9, LEFT), det(0.92, LEFT), det(0.91, LEFT)]},
        1.0, True, True,
    ),
    # four kept: strict credit 1 - 1/3; GenEval: first 3 suffice but exclude (>= 4 apples) fails
    (
        "count four found",
        THREE_APPLES,
        {"apple": [det(0.95, LEFT), det(0.93, LEFT), det(0.92, LEFT), det(0.91, LEFT)]},
        2 / 3, False, False,
    ),
    ("count two found", THREE_APPLES, {"apple": [det(0.95, LEFT), det(0.93, LEFT)]}, 2 / 3, False, False),
    ("colour match", RED_CAR, {"car": [det(0.9, CENTRE, "r1")]}, 1.0, True, True),
    ("colour mismatch", RED_CAR, {"car": [det(0.9, CENTRE, "b1")]}, 0.5, False, False),
    ("colour object missing", RED_CAR, {}, 0.0, False, False),
    # 2 cars for 1: strict adds 0 for the count and 0 for the colour; GenEval looks at the best car (red)
    ("colour extra object", RED_CAR, {"car": [det(0.8, LEFT, "b1"), det(0.9, RIGHT, "r1")]}, 0.0, False, True),
    (
        "color_attr one wrong",
        PINK_BAG_BLACK_SCISSORS,
        {"handbag": [det(0.7, LEFT, "p1")], "scissors": [det(0.7, RIGHT, "w1")]},
        0.75, False, False,
    ),
    (
        "color_attr both right",
        PINK_BAG_BLACK_SCISSORS,
        {"handbag": [det(0.7, LEFT, "p1")], "scissors": [det(0.7, RIGHT, "k1")]},
        1.0, True, True,
    ),
    ("count colours 2 of 2", TWO_RED_CARS, {"car": [det(0.95, LEFT, "r1"), det(0.97, RIGHT, "r2")]}, 1.0, True, True),
    # colour credit 1 - |2 - 1| / 2 = 0.5 -> mean(1, 0.5)
    ("count colours 1 of 2", TWO_RED_CARS, {"car": [det(0.95, LEFT, "r1"), det(0.97, RIGHT, "b1")]}, 0.75, False, False),
    # position: credits dog 1, cat count 1, cat relation 1
    ("position holds", CAT_LEFT_OF_DOG, {"dog": [det(0.9, RIGHT)], "cat": [det(0.9, LEFT)]}, 1.0, True, True),
    # relation fails: cat credits 1 (count), 0 (relation) and the reference's trailing 1 -> mean(1, 1, 0, 1)
    ("position fails, quirk", CAT_LEFT_OF_DOG, {"dog": [det(0.9, LEFT)], "cat": [det(0.9, RIGHT)]}, 0.75, False, False),
    # target group failed (no dog): dog 0; cat 1 (count), 0 (no target) -> 1/3
    ("position target missing", CAT_LEFT_OF_DOG, {"cat": [det(0.9, LEFT)]}, 1 / 3, False, False),
    # the cat itself missing: dog 1; cat count 0 and one 0 for its position -> 1/3
    ("position subject missing", CAT_LEFT_OF_DOG, {"dog": [det(0.9, RIGHT)]}, 1 / 3, False, False),
    # 2 cats for 1: strict fails on the count; GenEval checks the best cat only (left of the dog)
    (
        "position extra subject",
        CAT_LEFT_OF_DOG,
        {"dog": [det(0.9, RIGHT)], "cat": [det(0.9, LEFT), det(0.5, (85, 0, 95, 10))]},
        1 / 3, False, True,
    ),
    # target group failed on colour (blue dog): dog 1 + 0 (colour); cat 1 (count) + 0 (no target) -> 0.5
    ("position target failed colour", CAT_ABOVE_RED_DOG, {"dog": [det(0.9, BOTTOM, "b1")], "cat": [det(0.9, TOP)]}, 0.5, False, False),
    ("position with colour holds", CAT_ABOVE_RED_DOG, {"dog": [det(0.9, BOTTOM, "r1")], "cat": [det(0.9, TOP)]}, 1.0, True, True),
]


@pytest.mark.parametrize("name, metadata, candidates, score, strict_correct, correct", CASES, ids=[c[0] for c in CASES])
def test_rule_table(name, metadata, candidates, score, strict_correct, correct):
    result = score_prompt(candidates, metadata, ColourTable(COLOURS), only_strict=False)
    assert result[0] == pytest.approx(score, abs=1e-12)
    assert result[1] is strict_correct and result[2] is correct


def test_only_strict_skips_geneval_correctness():
    candidates = {"dog": [det(0.8, CENTRE)]}
    assert score_prompt(candidates, ONE_DOG, ColourTable(COLOURS), only_strict=True) == (1.0, True, False)


def test_exclude_does_not_enter_strict_score():
    metadata = dict(ONE_DOG, exclude=[{"class": "cat", "count": 1}])
    candidates = {"dog": [det(0.8, CENTRE)], "cat": [det(0.8, LEFT)]}
    assert score_prompt(candidates, metadata, ColourTable(COLOURS)) == (1.0, True, False)
    # the exclude count is "at least count": 1 cat for an exclude of 2 does not fail
    metadata_two = dict(ONE_DOG, exclude=[{"class": "cat", "count": 2}])
    assert score_prompt(candidates, metadata_two, ColourTable(COLOURS)) == (1.0, True, True)


def test_colour_classifier_sees_best_objects_first():
    table = ColourTable(COLOURS)
    candidates = {"car": [det(0.4, LEFT, "b1"), det(0.96, RIGHT, "r1"), det(0.5, CENTRE, "r2")]}
    metadata = dict(TWO_RED_CARS, tag="colors")  # threshold 0.3: all three kept
    score, strict_correct, correct = score_prompt(candidates, metadata, table)
    # strict: 3 cars for 2 -> count credit 1 - 1/2 and a 0 for the colour; GenEval: best two are red
    assert (score, strict_correct, correct) == (0.25, False, True)
    assert table.calls == [("car", ["r1", "r2"])]


def test_select_detections_threshold_order_and_cap():
    # scores 0.505, 0.530, ..., 0.980 (i = 0..19); "bed" is below every threshold
    candidates = {"kite": [det(0.505 + 0.025 * i, (i, 0, i + 1, 1), i) for i in range(20)], "bed": [det(0.1, LEFT)]}
    kept = select_detections(candidates, "two_object")
    assert list(kept) == ["kite"]
    assert [obj.crop_id for obj in kept["kite"]] == list(range(19, 3, -1))  # 16 best, highest first
    assert all(isinstance(obj, DetectedObject) for obj in kept["kite"])
    counting = select_detections(candidates, "counting")
    assert [obj.crop_id for obj in counting["kite"]] == [19, 18, 17, 16]  # > 0.9 only (0.905 and up)


@pytest.mark.parametrize(
    "box_a, box_b, expected",
    [
        ((0, 0, 10, 10), (30, 0, 40, 10), {"left of"}),
        ((30, 0, 40, 10), (0, 0, 10, 10), {"right of"}),
        ((0, 0, 10, 10), (0, 30, 10, 40), {"above"}),
        ((0, 30, 10, 40), (0, 0, 10, 10), {"below"}),
        ((30, 30, 40, 40), (0, 0, 10, 10), {"right of", "below"}),  # dx = dy = 28 / 42.4 = 0.66
        ((0, 0, 10, 10), (1, 1, 11, 11), set()),  # offset 1 < margin 0.1 * 20: all revised 0
        ((0, 0, 10, 10), (3, 0, 13, 10), set()),  # revised -1, dx = -1/3: no relation
        ((0, 0, 10, 10), (8, 0, 18, 10), {"left of"}),  # revised -6, dx = -0.75
        # wide B: margin 0.1 * (10 + 100) = 11 leaves 34 of the x offset 45: dx = -34/45
        ((0, 0, 10, 10), (0, 0, 100, 10), {"left of"}),
        ((0, 0, 10, 10), (20, 20, 30, 30), {"left of", "above"}),
        ((0, 0, 10, 10), (10, 40, 20, 50), {"above"}),  # dx = -8/41 > -0.5, dy = -38/41
    ],
)
def test_relative_position(box_a, box_b, expected):
    assert relative_position(box_a, box_b) == expected


def test_parse_metadata_clause_types():
    prompt = parse_metadata(CAT_ABOVE_RED_DOG | {"exclude": [{"class": "cat", "count": 2}]})
    assert prompt == GenevalPrompt(
        tag="position",
        prompt="a cat above a red dog",
        include=(IncludeClause("dog", 1, "red", None), IncludeClause("cat", 1, None, ("above", 0))),
        exclude=(ExcludeClause("cat", 2),),
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({}, "include"),
        ({"tag": "x", "include": [{"class": "dog", "count": 0}]}, "count"),
        ({"tag": "x", "include": [{"class": "dog", "count": 1, "color": "teal"}]}, "colour"),
        ({"tag": "x", "include": [{"class": "dog", "count": 1, "position": ["near", 0]}]}, "relation"),
        ({"tag": "x", "include": [{"class": "dog", "count": 1, "position": ["above", 0]}]}, "earlier"),
        ({"tag": "x", "include": [{"count": 1}]}, "class"),
    ],
)
def test_parse_metadata_rejects_bad_rows(row, message):
    with pytest.raises(ValueError, match=message):
        parse_metadata(row)


def test_every_test_metadata_line_parses():
    path = SHARED_DATASETS / "geneval" / "test_metadata.jsonl"
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets directory {SHARED_DATASETS} is absent")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [parse_metadata(json.loads(line)) for line in lines]
    assert len(prompts) == len(lines) > 2000
    assert {prompt.tag for prompt in prompts} == set(TAGS)
    clauses = [clause for prompt in prompts for clause in prompt.include]
    assert all(isinstance(clause, IncludeClause) for clause in clauses)
    assert all(isinstance(clause, ExcludeClause) for prompt in prompts for clause in prompt.exclude)
    positions = [clause.position for clause in clauses if clause.position is not None]
    assert len(positions) == sum(prompt.tag == "position" for prompt in prompts)
    # every row also runs through the engine (no detections -> score 0, incorrect)
    for prompt in prompts[:200]:
        assert score_prompt({}, prompt, ColourTable(COLOURS)) == (0.0, False, False)


def test_geneval_fields_minus_ten_for_other_tags():
    fields = geneval_fields(["counting", "colors"], [0.5, 1.0], [False, True], [True, True])
    np.testing.assert_array_equal(fields["geneval"], [0.5, 1.0])
    np.testing.assert_array_equal(fields["strict_accuracy"], [0.0, 1.0])
    np.testing.assert_array_equal(fields["accuracy"], [1.0, 1.0])
    np.testing.assert_array_equal(fields["counting_strict_accuracy"], [0.0, -10.0])
    np.testing.assert_array_equal(fields["colors_accuracy"], [-10.0, 1.0])
    np.testing.assert_array_equal(fields["position_accuracy"], [-10.0, -10.0])
    assert set(fields) == {"geneval", "strict_accuracy", "accuracy"} | {
        f"{tag}_{kind}" for tag in TAGS for kind in ("strict_accuracy", "accuracy")
    }
    failed = failed_geneval_fields([{"tag": "position"}, {}])
    np.testing.assert_array_equal(failed["position_strict_accuracy"], [0.0, -10.0])
