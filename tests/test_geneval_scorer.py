"""GenEval scorer end to end (SPEC section 6) with a tiny Mask2Former and a tiny CLIP,
both built from configs, saved, and loaded back through from_pretrained; plus the
remote (JSON over HTTP) client against a local server.

The detector's weights are random except two choices that make its output
predictable: the class head always says "dog" (bias 12 on that label) and the
mask logits are scaled up, so each of its NUM_QUERIES queries is a dog with
high confidence (about 0.996 with transformers 5.24; an older transformers gave
0.7-0.87, so the counting row's expectation follows the observed confidence).
Everything else (preprocessing, post-processing, mask
boxes, crops, CLIP colours, rules) is the real code.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rewards_pickscore import build_tiny_clip  # noqa: E402

from advantage_weighted_matching.rewards import REWARDS, multi_score  # noqa: E402
from advantage_weighted_matching.rewards.geneval import (  # noqa: E402
    boxes_from_masks, jpeg_round_trip, load_object_names, masked_box_crop,
)
from advantage_weighted_matching.rewards.geneval_rules import COLORS, TAGS  # noqa: E402

IMAGE_SIZE = 64
NUM_QUERIES = 1
DOG, CAT, MOUSE = 16, 15, 64


def build_tiny_mask2former(directory, seed=0):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    torch.manual_seed(seed)
    id2label = {i: f"thing{i}" for i in range(80)}
    id2label.update({DOG: "dog", CAT: "cat", MOUSE: "mouse"})
    backbone = SwinConfig(
        image_size=IMAGE_SIZE, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
        window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, num_queries=NUM_QUERIES, common_stride=4,
        id2label=id2label, label2id={name: i for i, name in id2label.items()},
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[DOG] = 12.0  # softmax(dog) = e^12 / (e^12 + 80) > 0.999
        last = model.model.transformer_module.decoder.mask_predictor.mask_embedder.get_submodule("2.0")
        last.weight.mul_(10000.0)  # sharp masks: mean sigmoid over the mask pixels close to 1
        last.bias.mul_(10000.0)
    model.save_pretrained(str(directory))
    Mask2FormerImageProcessor(size={"shortest_edge": IMAGE_SIZE, "longest_edge": 2 * IMAGE_SIZE}).save_pretrained(
        str(directory)
    )
    return str(directory)


@pytest.fixture(scope="module")
def reward_config(tmp_path_factory):
    return {
        "geneval_detector": build_tiny_mask2former(tmp_path_factory.mktemp("tiny_mask2former")),
        "geneval_clip": build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_geneval"), seed=1),
        "batch_size": 4,
    }


@pytest.fixture(scope="module")
def geneval_fn(reward_config):
    return REWARDS["geneval"]("cpu", reward_config)


METADATA = [
    {"tag": "single_object", "prompt": "a photo of a dog", "include": [{"class": "dog", "count": 1}]},
    {"tag": "two_object", "prompt": "a dog and a cat", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]},
    {"tag": "counting", "prompt": "two dogs", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]},
    {"tag": "colors", "prompt": "a red dog", "include": [{"class": "dog", "count": 1, "color": "red"}]},
    {
        "tag": "position",
        "prompt": "a cat left of a dog",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
    },
    {"tag": "color_attr", "prompt": "a computer mouse", "include": [{"class": "computer mouse", "count": 1}]},
    {},  # a text-file prompt: not a GenEval row -> this image fails and scores 0
]
# strict score per row given one dog (colour row: see the test); position: dog 1, cat 0 and 0;
# counting row (2 dogs asked): 1 - 1/2 when the dog passes the 0.9 counting threshold, else 0
EXPECTED_SCORES = {0: 1.0, 1: 0.5, 4: 1 / 3, 5: 0.0, 6: 0.0}
EXPECTED_STRICT = {0: 1.0, 1: 0.0, 2: 0.0, 4: 0.0, 5: 0.0, 6: 0.0}


def _images(seed=0):
    return torch.rand((len(METADATA), 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(seed))


def _dog_scores(scorer, images):
    """Confidence of the single dog the tiny detector finds in each image (after the JPEG round trip)."""
    images_uint8 = jpeg_round_trip((images * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return np.array([candidates["dog"][0][0] for candidates, _masks in scorer.detect_chunk(images_uint8)])


def test_tiny_detector_sees_one_confident_dog(geneval_fn):
    scorer = geneval_fn.scorer
    assert scorer.class_names[DOG] == "dog" and scorer.class_names[MOUSE] == "computer mouse"
    images_uint8 = (_images()[:2] * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for candidates, masks in scorer.detect_chunk(images_uint8):
        assert list(candidates) == ["dog"] and len(candidates["dog"]) == NUM_QUERIES
        score, box, mask_index = candidates["dog"][0]
        # ~0.996 with the pinned transformers (5.24); the mask score depends on the version
        assert 0.3 < score <= 1.0
        assert masks.shape == (NUM_QUERIES, IMAGE_SIZE, IMAGE_SIZE) and masks.dtype == bool and masks[0].any()
        np.testing.assert_array_equal(box, boxes_from_masks(masks)[mask_index])


def test_end_to_end_fields_ranges_and_minus_ten(geneval_fn, caplog):
    with caplog.at_level("WARNING"):
        scores, info = geneval_fn(_images(), [row.get("prompt", "x") for row in METADATA], METADATA, only_strict=False)
    assert scores.shape == (len(METADATA),) and scores.dtype == np.float64
    expected_keys = {"strict_accuracy", "accuracy", "num_failures"} | {
        f"{tag}_{kind}" for tag in TAGS for kind in ("strict_accuracy", "accuracy")
    }
    assert set(info) == expected_keys
    assert info["num_failures"] == 1 and "include" in caplog.text  # the {} row
    counting_dog_kept = _dog_scores(geneval_fn.scorer, _images()[2:3])[0] > 0.9
    assert scores[2] == (0.5 if counting_dog_kept else 0.0)
    for index, expected in EXPECTED_SCORES.items():
        assert scores[index] == pytest.approx(expected, abs=1e-12), index
        assert info["strict_accuracy"][index] == EXPECTED_STRICT[index], index
    # the colour row: 1 with strict success when CLIP calls the dog red, else 0.5 and failure
    red = info["strict_accuracy"][3] == 1.0
    assert scores[3] == (1.0 if red else 0.5) and info["accuracy"][3] == float(red)
    # GenEval correctness: only the single dog (and maybe the red dog) are correct
    np.testing.assert_array_equal(np.delete(info["accuracy"], 3), [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    for tag in TAGS:
        for kind in ("strict_accuracy", "accuracy"):
            values = info[f"{tag}_{kind}"]
            own = np.array([row.get("tag") == tag for row in METADATA])
            np.testing.assert_array_equal(values[~own], -10.0)
            np.testing.assert_array_equal(values[own], info[kind][own])
    assert np.all(scores <= 1.0)
    assert set(np.unique(info["strict_accuracy"])) <= {0.0, 1.0}


def test_colour_crop_and_classifier_agree_with_the_rule(geneval_fn):
    scorer = geneval_fn.scorer
    images = _images()
    images_uint8 = jpeg_round_trip((images * 255).round().byte().permute(0, 2, 3, 1).numpy())
    (candidates, masks), = scorer.detect_chunk(images_uint8[3:4])
    score, box, mask_index = candidates["dog"][0]
    crop = masked_box_crop(images_uint8[3], masks[mask_index], box)
    x1, y1, x2, y2 = (int(v) for v in box)
    assert crop.shape == (y2 - y1, x2 - x1, 3)
    outside = ~masks[mask_index][y1:y2, x1:x2]
    assert (crop[outside] == 153).all()
    np.testing.assert_array_equal(crop[~outside], images_uint8[3][y1:y2, x1:x2][~outside])
    colour = scorer.classify_crops("dog", [crop])[0]
    assert colour in COLORS
    text = scorer.colour_text_embeddings("dog")
    assert text.shape == (len(COLORS), 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(COLORS)))
    scores, info = geneval_fn(images[3:4], ["a red dog"], [METADATA[3]], only_strict=False)
    assert info["strict_accuracy"][0] == float(colour == "red")


def _pil_jpeg_q75(image_uint8):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_uint8).save(buffer, format="JPEG", quality=75)  # PIL's default, stated explicitly
    return np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def test_jpeg_round_trip_is_pil_quality_75():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 24, 32, 3), dtype=np.uint8)
    out = jpeg_round_trip(images)
    assert out.shape == images.shape and out.dtype == np.uint8
    for image, got in zip(images, out):
        np.testing.assert_array_equal(got, _pil_jpeg_q75(image))
    assert np.abs(out.astype(int) - images.astype(int)).mean() > 5  # lossy on noise: it really re-encodes
    # quality 95 would give a different image: the default (75) is what is pinned
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="JPEG", quality=95)
    assert not np.array_equal(np.array(Image.open(buffer).convert("RGB")), out[0])


def test_detector_and_colour_classifier_see_the_jpeg_decoded_image(geneval_fn, monkeypatch):
    scorer = geneval_fn.scorer
    images = _images()[3:5]
    expected = np.stack([_pil_jpeg_q75(im) for im in (images * 255).round().byte().permute(0, 2, 3, 1).numpy()])
    seen_by_detector, seen_by_colour = [], []
    detect, colour = scorer.detect_chunk, scorer.colour_classifier

    def spy_detect(chunk):
        seen_by_detector.append(np.array(chunk))
        return detect(chunk)

    def spy_colour(image_uint8, masks):
        seen_by_colour.append(np.array(image_uint8))
        return colour(image_uint8, masks)

    monkeypatch.setattr(scorer, "detect_chunk", spy_detect)
    monkeypatch.setattr(scorer, "colour_classifier", spy_colour)
    geneval_fn(images, ["a red dog", "x"], [METADATA[3], METADATA[0]], only_strict=True)
    np.testing.assert_array_equal(np.concatenate(seen_by_detector), expected)
    np.testing.assert_array_equal(np.stack(seen_by_colour), expected)


def test_only_strict_reports_zero_accuracy(geneval_fn):
    scores, info = geneval_fn(_images()[:3], ["x"] * 3, METADATA[:3], only_strict=True)
    counting = 0.5 if _dog_scores(geneval_fn.scorer, _images()[2:3])[0] > 0.9 else 0.0
    np.testing.assert_allclose(scores, [1.0, 0.5, counting])
    np.testing.assert_array_equal(info["accuracy"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(info["single_object_accuracy"], [0.0, -10.0, -10.0])
    np.testing.assert_array_equal(info["single_object_strict_accuracy"], [1.0, -10.0, -10.0])


def test_multi_score_carries_geneval_fields(reward_config):
    fn = multi_score("cpu", {"geneval": 1.0}, reward_config)
    result, info = fn(_images()[:2], ["a", "b"], METADATA[:2], only_strict=True)
    np.testing.assert_allclose(result["geneval"], [1.0, 0.5])
    np.testing.assert_allclose(result["avg"], [1.0, 0.5])
    np.testing.assert_array_equal(result["accuracy"], [0.0, 0.0])
    np.testing.assert_array_equal(result["two_object_strict_accuracy"], [-10.0, 0.0])
    assert info["num_failures"] == 0


def test_object_names_and_mask_boxes(tmp_path):
    assert load_object_names("", {0: "mouse", 1: "dog", 2: "remote", 3: "keyboard"}) == [
        "computer mouse", "dog", "tv remote", "computer keyboard",
    ]
    names_file = tmp_path / "names.txt"
    names_file.write_text("alpha\nbeta\n")
    assert load_object_names(str(names_file), {0: "a", 1: "b"}) == ["alpha", "beta"]
    with pytest.raises(ValueError, match="2 names"):
        load_object_names(str(names_file), {0: "a", 1: "b", 2: "c"})
    masks = np.zeros((2, 6, 8), dtype=bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, cols 2-4
    masks[1, 5, 7] = True
    np.testing.assert_array_equal(boxes_from_masks(masks), [[2, 1, 5, 3], [7, 5, 8, 6]])


# ---- remote client (JSON over HTTP) -------------------------------------------------------------


def test_remote_client_matches_in_process_scorer(geneval_fn, reward_config):
    from advantage_weighted_matching.rewards.remote_geneval import scorer_as_score_fn, serve_geneval

    server = serve_geneval(scorer_as_score_fn(geneval_fn.scorer), host="127.0.0.1", port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        remote_fn = REWARDS["geneval"]("cpu", {**reward_config, "remote_geneval_url": url})
        assert hasattr(remote_fn, "client")  # the remote path, not a second local scorer
        images, prompts = _images(1)[:6], ["x"] * 6
        for only_strict in (False, True):
            local_scores, local_info = geneval_fn(images, prompts, METADATA[:6], only_strict=only_strict)
            remote_scores, remote_info = remote_fn(images, prompts, METADATA[:6], only_strict=only_strict)
            np.testing.assert_array_equal(remote_scores, local_scores)
            assert set(remote_info) == set(local_info)
            for key, value in local_info.items():
                np.testing.assert_array_equal(remote_info[key], value, err_msg=key)
    finally:
        server.shutdown()
        server.server_close()


def test_remote_outage_costs_the_batch_not_the_run(monkeypatch):
    from advantage_weighted_matching.rewards.remote_geneval import serve_geneval

    def broken_score_fn(images, metadata, only_strict):
        raise RuntimeError("detector out of memory")

    server = serve_geneval(broken_score_fn, host="127.0.0.1", port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        fn = multi_score("cpu", {"geneval": 1.0, "jpeg_compressibility": 0.5},
                         {"remote_geneval_url": url, "remote_geneval_retries": 0})  # retries: test_reward_failures
        result, info = fn(torch.zeros(2, 3, 8, 8), ["a", "b"], METADATA[:2], only_strict=False)
    finally:
        server.shutdown()
        server.server_close()
    np.testing.assert_array_equal(result["geneval"], [0.0, 0.0])
    np.testing.assert_array_equal(result["single_object_strict_accuracy"], [0.0, -10.0])
    np.testing.assert_allclose(result["avg"], 0.5 * result["jpeg_compressibility"])
    assert info["num_failures"] == 2
