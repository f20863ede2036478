"""The coloured-shapes toy task (issue F.2): generator, prompt grammar, the
"shapes" reward (hand-made cases with hand-computed values), prompt files, and
a pretraining smoke run that writes a loadable StableDiffusion3Pipeline."""

import json
import os

import numpy as np
import pytest
import torch

from advantage_weighted_matching.prompts import load_prompts
from advantage_weighted_matching.rewards import REWARDS, multi_score
from advantage_weighted_matching.rewards.shapes import label_components, score_shapes
from advantage_weighted_matching.toy.shapes import (
    PALETTE,
    ShapePromptError,
    all_specs,
    make_dataset,
    parse_prompt,
    prompt_for,
    render,
    sample_spec,
    shape_mask,
    write_prompt_files,
)


def _to_nchw01(images_uint8):
    return torch.from_numpy(np.asarray(images_uint8)).permute(0, 3, 1, 2).float() / 255


def _draw(boxes, size=32):
    """Black uint8 image with filled squares: boxes = [(colour, y, x, side), ...]."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for colour, y, x, side in boxes:
        image[y : y + side, x : x + side] = PALETTE[colour]
    return image


# ---- generator --------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_seed_dependent():
    images, prompts, metadata = make_dataset(24, seed=3)
    again_images, again_prompts, again_metadata = make_dataset(24, seed=3)
    other_images, _, _ = make_dataset(24, seed=4)
    assert images.dtype == np.uint8 and images.shape == (24, 32, 32, 3)
    assert np.array_equal(images, again_images) and prompts == again_prompts and metadata == again_metadata
    assert not np.array_equal(images, other_images)
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    spec = sample_spec(rng_a)
    assert spec == sample_spec(rng_b) and set(spec) == {"count", "color", "shape"}
    assert np.array_equal(render(spec, rng_a), render(spec, rng_b))


def test_renders_hold_exactly_the_spec():
    images, prompts, metadata = make_dataset(60, seed=0)
    for image, prompt, spec in zip(images, prompts, metadata):
        assert prompt == prompt_for(spec)
        colours = {tuple(p) for p in image.reshape(-1, 3)}
        assert colours == {(0, 0, 0), PALETTE[spec["color"]]}
        foreground = (image != 0).any(-1)
        labels = label_components(foreground[None])
        assert len(np.unique(labels[labels > 0])) == spec["count"]  # non-overlapping, not touching
        assert not foreground[0].any() and not foreground[-1].any()  # 1 px border
        assert not foreground[:, 0].any() and not foreground[:, -1].any()
        assert 52 <= foreground.sum() / spec["count"] <= 144  # 8-12 px discs / squares


def test_shape_mask_footprints():
    assert shape_mask("square", 8).sum() == 64
    disc = shape_mask("circle", 10)
    assert disc.sum() < 100 and disc[5, 5] and not disc[0, 0] and disc[0, 4] and disc[0, 5]


# ---- prompt grammar ---------------------------------------------------------------------------


def test_prompt_round_trip_over_all_specs():
    specs = all_specs()
    assert len(specs) == 24
    for spec in specs:
        assert parse_prompt(prompt_for(spec)) == spec
    assert prompt_for({"count": 1, "color": "blue", "shape": "circle"}) == "a blue circle"
    assert prompt_for({"count": 2, "color": "red", "shape": "square"}) == "two red squares"
    assert parse_prompt("  One Yellow Circle ") == {"count": 1, "color": "yellow", "shape": "circle"}


@pytest.mark.parametrize(
    "prompt",
    ["", "two red square", "a red squares", "four red squares", "two purple squares", "two  red squares",
     "red squares", "an red square", "two red squares.", "a photo of two red squares", None],
)
def test_prompt_parser_rejects_garbage_with_a_clear_error(prompt):
    with pytest.raises(ShapePromptError) as error:
        parse_prompt(prompt)
    message = str(error.value)
    assert repr(prompt) in message and ("expected" in message or "must be a string" in message)


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="bad shapes spec"):
        prompt_for({"count": 4, "color": "red", "shape": "square"})


# ---- reward -----------------------------------------------------------------------------------


def test_reward_is_one_on_clean_renders_and_high_under_noise():
    scorer = REWARDS["shapes"]("cpu", None)
    images, prompts, metadata = make_dataset(200, seed=11)
    scores, info = scorer(_to_nchw01(images), prompts, metadata)
    assert scores.dtype == np.float64 and scores.shape == (200,)
    assert np.all(scores == 1.0) and np.all(info["count_accuracy"] == 1) and np.all(info["color_accuracy"] == 1)
    assert np.all(info["shape_accuracy"] == 1) and info["num_failures"] == 0
    # Pixel noise (std 25 of 255) and a 3x3 box blur: still found and counted.
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.normal(0, 25, images.shape), 0, 255)
    padded = np.pad(noisy, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, dy : dy + 32, dx : dx + 32] for dy in range(3) for dx in range(3)) / 9
    for degraded in (noisy, blurred):
        scores, _ = scorer(_to_nchw01(np.round(degraded).astype(np.uint8)), prompts, metadata)
        assert scores.mean() >= 0.95


SQUARES_2 = [("red", 2, 2, 10), ("red", 18, 18, 10)]
SPECKS = [("red", 14, 0, 2), ("red", 0, 28, 3), ("green", 28, 0, 3)]  # areas 4, 9, 9 < 12: ignored


@pytest.mark.parametrize(
    "prompt, boxes, expected, count_acc, colour_acc",
    [
        ("two red squares", SQUARES_2, 1.0, 1.0, 1.0),
        ("two red squares", SQUARES_2 + SPECKS, 1.0, 1.0, 1.0),
        ("two blue squares", SQUARES_2, 0.0, 0.0, 0.0),  # wrong colour
        ("three red squares", SQUARES_2, 0.5 + 0.5 * (1 - 1 / 3), 2 / 3, 1.0),  # one too few
        ("a red square", SQUARES_2, 0.5, 0.0, 1.0),  # one too many for n = 1
        ("two red squares", SQUARES_2 + [("red", 2, 18, 10)], 0.75, 0.5, 1.0),  # one too many
        ("a red square", SQUARES_2 + [("red", 2, 18, 10)], 0.5, 0.0, 1.0),  # clipped at 0
        ("two red squares", SQUARES_2 + [("blue", 2, 18, 10)], 0.5 * 2 / 3 + 0.5, 1.0, 2 / 3),  # extra colour
        ("two red squares", [("red", 2, 2, 10), ("yellow", 18, 18, 10)], 0.5 * 0.5 + 0.5 * 0.5, 0.5, 0.5),
        ("two red squares", [], 0.0, 0.0, 0.0),  # empty image
        ("two red squares", [("red", 2, 2, 10), ("red", 12, 2, 10)], 0.5 + 0.5 * 0.5, 0.5, 1.0),  # touching: one blob
    ],
)
def test_reward_table(prompt, boxes, expected, count_acc, colour_acc):
    scorer = REWARDS["shapes"]("cpu", None)
    scores, info = scorer(_to_nchw01(_draw(boxes)[None]), [prompt], [{}])
    assert scores[0] == pytest.approx(expected, abs=1e-12)
    assert info["count_accuracy"][0] == pytest.approx(count_acc)
    assert info["color_accuracy"][0] == pytest.approx(colour_acc)


def test_reward_pixel_classes_and_shape_diagnostic():
    grey = np.full((1, 32, 32, 3), 128, dtype=np.uint8)  # 221 from black, > 127.5 from every colour
    assert score_shapes(grey, [parse_prompt("a red square")])[0][0] == 0.0
    dull_red = _draw([("red", 4, 4, 10)])
    dull_red[4:14, 4:14] = (170, 40, 30)  # 99 from pure red, 177 from black: still red
    assert score_shapes(dull_red[None], [parse_prompt("a red square")])[0][0] == 1.0
    reward, _, _, shape_accuracy, found = score_shapes(_draw(SQUARES_2)[None], [parse_prompt("two red circles")])
    assert reward[0] == 1.0 and shape_accuracy[0] == 0.0 and found[0] == 2  # shape is not in the reward


def test_label_components_is_4_connected_and_batch_separated():
    mask = np.zeros((2, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal: two components
    mask[0, 3, :] = True
    mask[1, :, 0] = True
    labels = label_components(mask)
    assert len(np.unique(labels[0][labels[0] > 0])) == 3 and len(np.unique(labels[1][labels[1] > 0])) == 1
    assert not set(np.unique(labels[0])) & set(np.unique(labels[1])) - {0}


def test_scorer_interface_and_bad_prompts():
    scorer = REWARDS["shapes"]("cpu", {"batch_size": 4})
    images, prompts, metadata = make_dataset(3, seed=0)
    with pytest.raises(ShapePromptError, match="cannot parse"):
        scorer(_to_nchw01(images), prompts[:2] + ["a cat"], metadata)
    rewards, info = multi_score("cpu", {"shapes": 1.0})(_to_nchw01(images), prompts, metadata)
    assert np.all(rewards["shapes"] == 1.0) and np.all(rewards["avg"] == 1.0)
    assert set(info) >= {"num_failures", "count_accuracy", "color_accuracy", "shape_accuracy"}


def test_prompt_files_load_in_general_ocr_format(tmp_path):
    write_prompt_files(tmp_path, n_train=50, n_test=48, seed=0)
    train, train_metadata = load_prompts(str(tmp_path), "general_ocr", "train")
    test, _ = load_prompts(str(tmp_path), "general_ocr", "test")
    assert len(train) == 50 and len(test) == 48 and train_metadata == [{}] * 50
    assert all(parse_prompt(p) for p in train + test)
    assert sorted(set(test)) == sorted(prompt_for(s) for s in all_specs()) and all(test.count(p) == 2 for p in test)
    write_prompt_files(tmp_path / "again", n_train=50, n_test=48, seed=0)
    assert (tmp_path / "again" / "train.txt").read_text() == (tmp_path / "train.txt").read_text()


# ---- pretraining smoke run --------------------------------------------------------------------


def test_pretrain_smoke_writes_a_loadable_pipeline(tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    from advantage_weighted_matching.toy import pretrain

    out = tmp_path / "toy"
    threads = torch.get_num_threads()
    try:
        pretrain.main([
            "--out", str(out), "--transformer_steps", "2", "--vae_steps", "1", "--num_images", "16",
            "--eval_prompts", "3", "--eval_steps", "2",
        ])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "VAE 1 steps" in printed and "transformer 2 steps" in printed and "scenes reward" in printed
    assert (out / "samples.png").is_file()
    info = json.loads((out / "toy_info.json").read_text())
    assert info["vae_steps"] == 1 and info["transformer_steps"] == 2 and info["max_sequence_length"] == 16
    assert info["recipe"] == "scenes" and info["task"] == "scenes" and not info["hit_time_cap"]
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(out))
    assert pipeline.tokenizer.model_max_length == 16
    for word in pretrain.toy_words():  # every toy word is one token of each tokenizer, after a reload
        for tokenizer in (pipeline.tokenizer, pipeline.tokenizer_2, pipeline.tokenizer_3):
            assert len(tokenizer.tokenize(word)) == 1, (word, tokenizer.tokenize(word))
    assert pipeline.vae.config.scaling_factor == pytest.approx(info["vae_scaling_factor"])
    images, scores, extra = pretrain.sample_and_score(pipeline, ["a red square", "two blue circles"], num_steps=2,
                                                      task="shapes")
    assert images.shape == (2, 3, 32, 32) and scores.shape == (2,) and extra["count_accuracy"].shape == (2,)
    stamp = os.path.getmtime(out / "model_index.json")
    assert pretrain.ensure_toy_pipeline(str(out)) == str(out) and os.path.getmtime(out / "model_index.json") == stamp
    with pytest.raises(ValueError, match="max_minutes"):
        pretrain.pretrain(str(tmp_path / "never"), max_minutes=11)
    with pytest.raises(ValueError, match="recipe"):
        pretrain.ensure_toy_pipeline(str(tmp_path / "never"), recipe="nope")


def test_pretraining_is_reproducible(tmp_path):
    """Same recipe and seed, one thread: the same weights, byte for byte."""
    from safetensors.torch import load_file

    from advantage_weighted_matching.toy import pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("a", "b"):
            pretrain.pretrain(str(tmp_path / name), vae_steps=2, transformer_steps=3, num_images=32)
    finally:
        torch.set_num_threads(threads)
    for component in ("transformer", "vae"):
        first = load_file(str(tmp_path / "a" / component / "diffusion_pytorch_model.safetensors"))
        second = load_file(str(tmp_path / "b" / component / "diffusion_pytorch_model.safetensors"))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), component
