"""The "scenes" toy task (issue H.1): generator, prompt grammar, the committed prompt
files, and the "scenes" reward on hand-made images with hand-computed values and on
the generator's ground truth (the reward's ceiling)."""

import numpy as np
import pytest
import torch

from advantage_weighted_matching.paths import dataset_dir
from advantage_weighted_matching.prompts import load_prompts
from advantage_weighted_matching.rewards import REWARDS, multi_score
from advantage_weighted_matching.rewards.scenes import NOT_APPLICABLE, score_scenes
from advantage_weighted_matching.rewards.shapes import label_components
from advantage_weighted_matching.toy.scenes import (
    KINDS,
    PALETTE,
    RELATION_MARGIN,
    ScenePromptError,
    all_specs,
    balanced_prompts,
    make_dataset,
    parse_prompt,
    prompt_for,
    relation_holds,
    render,
    sample_spec,
    write_prompt_files,
)


def _to_nchw01(images_uint8):
    return torch.from_numpy(np.asarray(images_uint8)).permute(0, 3, 1, 2).float() / 255


def _draw(boxes, size=32):
    """Black uint8 image with filled squares: boxes = [(colour, y, x, side), ...]."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for colour, y, x, side in boxes:
        image[y: y + side, x: x + side] = PALETTE[colour]
    return image


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return ys.mean(), xs.mean()


# ---- generator and grammar --------------------------------------------------------------------


def test_dataset_is_deterministic_and_covers_the_kinds():
    images, prompts, specs = make_dataset(90, seed=3)
    again = make_dataset(90, seed=3)
    assert images.dtype == np.uint8 and images.shape == (90, 32, 32, 3)
    assert np.array_equal(images, again[0]) and prompts == again[1] and specs == again[2]
    assert not np.array_equal(images, make_dataset(90, seed=4)[0])
    assert {spec["kind"] for spec in specs} == set(KINDS)
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    spec = sample_spec(rng_a)
    assert spec == sample_spec(rng_b) and np.array_equal(render(spec, rng_a), render(spec, rng_b))


def test_renders_hold_exactly_the_spec():
    images, prompts, specs = make_dataset(150, seed=0)
    for image, prompt, spec in zip(images, prompts, specs):
        assert parse_prompt(prompt) == spec
        colours = {tuple(p) for p in image.reshape(-1, 3)} - {(0, 0, 0)}
        assert colours == {PALETTE[o["color"]] for o in spec["objects"]}
        centres = []
        for group in spec["objects"]:
            mask = (image == PALETTE[group["color"]]).all(-1)
            labels = label_components(mask[None])
            assert len(np.unique(labels[labels > 0])) == group["count"], prompt  # separate, not touching
            centres.append(_centroid(mask))
        if spec["relation"]:  # holds, with the margin
            (ya, xa), (yb, xb) = centres
            assert relation_holds(spec["relation"], ya - yb, xa - xb), prompt
            assert abs(abs(xa - xb) - abs(ya - yb)) >= RELATION_MARGIN - 1e-9, prompt
        foreground = (image != 0).any(-1)
        assert not foreground[[0, -1]].any() and not foreground[:, [0, -1]].any()  # 1 px border


def test_prompt_space_and_round_trip():
    sizes = {kind: len(all_specs(kind)) for kind in KINDS}
    assert sizes == {"count": 32, "pair": 192, "relation": 192}
    for kind in KINDS:
        for spec in all_specs(kind):
            assert parse_prompt(prompt_for(spec)) == spec
    assert prompt_for({"kind": "count", "objects": [{"count": 4, "color": "red", "shape": "circle"}],
                       "relation": None}) == "four red circles"
    assert parse_prompt(" A Red Square and two Blue Circles ")["objects"][1] == {
        "count": 2, "color": "blue", "shape": "circle"}
    assert parse_prompt("a red circle left of a blue square")["relation"] == "left of"


@pytest.mark.parametrize("prompt", [
    "", "five red squares", "two red square", "a red squares", "a red square and a red circle",
    "three red squares and a blue circle", "two red squares left of a blue circle", "a red square left a blue square",
    "a red square left of a red circle", "a purple square", "a red square and a blue circle and a green square",
    "a photo of a red square", None,
])
def test_prompt_parser_rejects_garbage_with_a_clear_error(prompt):
    with pytest.raises(ScenePromptError) as error:
        parse_prompt(prompt)
    assert repr(prompt) in str(error.value)


@pytest.mark.parametrize("relation, dy, dx, expected", [
    ("left of", 0, -5, True), ("left of", 4, -5, True), ("left of", 5, -5, False), ("left of", 0, 5, False),
    ("right of", -3, 5, True), ("above", -5, 4, True), ("above", 5, 0, False), ("below", 5, -4, True),
])
def test_relation_rule(relation, dy, dx, expected):
    assert bool(relation_holds(relation, dy, dx)) is expected


def test_balanced_test_prompts_and_the_committed_files(tmp_path):
    prompts = balanced_prompts(64, 0)
    kinds = [parse_prompt(p)["kind"] for p in prompts]
    assert [kinds.count(k) for k in KINDS] == [22, 21, 21] and len(set(prompts)) == 64
    write_prompt_files(tmp_path, n_train=1000, n_test=64, seed=0)
    committed = dataset_dir("toy_scenes")
    for name in ("train.txt", "test.txt"):  # the repo's files are this function's output
        assert (tmp_path / name).read_text() == open(f"{committed}/{name}").read()
    train, metadata = load_prompts(committed, "general_ocr", "train")
    test, _ = load_prompts(committed, "general_ocr", "test")
    assert len(train) == 1000 and test == prompts and metadata == [{}] * 1000


# ---- reward -----------------------------------------------------------------------------------

RED_LEFT_BLUE = [("red", 10, 2, 10), ("blue", 10, 18, 10)]  # same row, red on the left


@pytest.mark.parametrize("prompt, boxes, expected", [
    # relation prompts: colour x count A x count B x relation
    ("a red square left of a blue square", RED_LEFT_BLUE, 1.0),
    ("a blue circle right of a red square", RED_LEFT_BLUE, 1.0),  # the shape word is not scored
    ("a blue square left of a red square", RED_LEFT_BLUE, 0.0),  # wrong side
    ("a red square above a blue square", RED_LEFT_BLUE, 0.0),  # side by side, not above
    ("a red square above a blue square", [("red", 2, 10, 10), ("blue", 18, 12, 10)], 1.0),
    ("a red square left of a blue square", [("red", 10, 2, 10)], 0.0),  # blue missing
    # pair prompts: colour x count A x count B
    ("a red square and two blue squares", [("red", 2, 2, 10), ("blue", 18, 2, 10), ("blue", 18, 18, 10)], 1.0),
    ("a red square and two blue squares", RED_LEFT_BLUE, 0.5),  # one blue of two
    ("a red square and two blue squares",  # an extra green square of the same area: colour 300 / 400
     [("red", 2, 2, 10), ("blue", 18, 2, 10), ("blue", 18, 18, 10), ("green", 2, 18, 10)], 0.75),
    ("two red squares and a blue square", [("red", 2, 2, 10), ("red", 2, 18, 10), ("red", 18, 2, 10),
                                           ("blue", 18, 18, 10)], 0.5),  # three red for two
    ("a red square and a green square", RED_LEFT_BLUE, 0.0),  # no green (and blue is off-prompt)
    # count prompts: colour x count
    ("four red squares", [("red", 2, 2, 10), ("red", 2, 18, 10), ("red", 18, 2, 10), ("red", 18, 18, 10)], 1.0),
    ("four red squares", [("red", 2, 2, 10), ("red", 2, 18, 10), ("red", 18, 2, 10)], 0.75),
    ("three red squares", [("red", 2, 2, 10), ("red", 2, 18, 10), ("blue", 18, 2, 10), ("red", 18, 18, 10)],
     0.75),  # right count, a quarter of the pixels off-prompt
    ("a yellow square", [("yellow", 2, 2, 10), ("yellow", 2, 18, 10)], 0.0),  # one too many for "a"
    ("a yellow square", [("yellow", 2, 2, 10), ("red", 0, 28, 3)], 1.0),  # a 9 px speck is ignored
    ("two green squares", [], 0.0),  # empty image
    ("a red square and a blue square", [], 0.0),
    ("a red square below a blue square", [], 0.0),
])
def test_reward_table(prompt, boxes, expected):
    scorer = REWARDS["scenes"]("cpu", None)
    scores, info = scorer(_to_nchw01(_draw(boxes)[None]), [prompt], [{}])
    assert scores.dtype == np.float64 and scores[0] == pytest.approx(expected, abs=1e-12)
    assert info["num_failures"] == 0
    assert (info["relation_accuracy"][0] == NOT_APPLICABLE) == (parse_prompt(prompt)["relation"] is None)
    assert info["strict_accuracy"][0] == float(expected == 1.0)


def test_relation_uses_the_largest_component_of_each_colour():
    # a small red square right of blue, the large red one left of it: the large one counts
    boxes = [("red", 10, 0, 12), ("blue", 10, 14, 8), ("red", 12, 26, 4)]
    result = score_scenes(_draw(boxes)[None], [parse_prompt("a red square left of a blue square")])
    assert result["relation_accuracy"][0] == 1.0
    assert result["count_accuracy"][0] == pytest.approx((0 + 1) / 2)  # two red components for one
    assert result["reward"][0] == 0.0


def test_ground_truth_scores_one_and_noise_keeps_it_high():
    """The ceiling: every render of the generator scores exactly 1 (>= 0.9 is the issue's bar)."""
    scorer = REWARDS["scenes"]("cpu", None)
    images, prompts, specs = make_dataset(300, seed=11)
    scores, info = scorer(_to_nchw01(images), prompts, [{}] * 300)
    assert np.all(scores == 1.0) and np.all(info["color_accuracy"] == 1) and np.all(info["count_accuracy"] == 1)
    assert np.all(info["strict_accuracy"] == 1)
    relation = info["relation_accuracy"][info["relation_accuracy"] != NOT_APPLICABLE]
    assert len(relation) > 50 and np.all(relation == 1)
    assert sorted(set(info["kind"].tolist())) == [0.0, 1.0, 2.0]
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 25, images.shape), 0, 255).round().astype(np.uint8)
    assert scorer(_to_nchw01(noisy), prompts, [{}] * 300)[0].mean() >= 0.95


def test_scorer_interface_and_bad_prompts():
    images, prompts, _ = make_dataset(3, seed=0)
    with pytest.raises(ScenePromptError, match="cannot parse"):
        REWARDS["scenes"]("cpu", None)(_to_nchw01(images), prompts[:2] + ["a cat"], [{}] * 3)
    rewards, info = multi_score("cpu", {"scenes": 1.0})(_to_nchw01(images), prompts, [{}] * 3)
    assert np.all(rewards["scenes"] == 1.0) and np.all(rewards["avg"] == 1.0)
    assert set(info) >= {"num_failures", "color_accuracy", "count_accuracy", "relation_accuracy", "kind"}


def test_benchmark_model_has_headroom(tmp_path):
    """The pretrained benchmark model scores at most 0.5 on the eval reward (the trainer's evaluation of
    the 64 test prompts) while its own VAE reproduces ground-truth scenes at reward >= 0.9. Needs the
    cached model (`toy_awm.ensure_toy_assets()`, about 3.5 minutes): skipped when it is not built."""
    import os

    from diffusers import StableDiffusion3Pipeline

    from advantage_weighted_matching.config.toy_awm import TOY_MODEL_DIR, toy_awm
    from advantage_weighted_matching.evaluation import evaluate
    from advantage_weighted_matching.prompts import load_prompts
    from advantage_weighted_matching.rollout import decode, flow_sigmas

    if not os.path.exists(os.path.join(TOY_MODEL_DIR, "model_index.json")):
        pytest.skip(f"benchmark toy model not built at {TOY_MODEL_DIR}")
    config = toy_awm()
    pipeline = StableDiffusion3Pipeline.from_pretrained(TOY_MODEL_DIR)
    pipeline.set_progress_bar_config(disable=True)
    scorer = multi_score("cpu", {"scenes": 1.0})
    prompts, metadata = load_prompts(config.dataset, config.prompt_fn, "test")
    rewards, _, _, _ = evaluate(
        pipeline, pipeline.transformer, prompts, metadata, scorer, sigmas=flow_sigmas(pipeline.scheduler, 16),
        resolution=32, batch_size=16, rank=0, num_processes=1, gather=lambda x: x, seed=1, device="cpu",
        max_sequence_length=config.max_sequence_length)
    assert len(rewards["avg"]) == 64 and rewards["avg"].mean() <= 0.5

    images, prompts, _ = make_dataset(64, seed=123)
    with torch.no_grad():
        latents = pipeline.vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
        latents = (latents - pipeline.vae.config.shift_factor) * pipeline.vae.config.scaling_factor
        decoded = decode(pipeline, latents)
    assert scorer(decoded, prompts, [{}] * 64)[0]["avg"].mean() >= 0.9
