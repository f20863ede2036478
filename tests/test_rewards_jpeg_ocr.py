"""JPEG compressibility and OCR rewards (SPEC section 6), the registry and multi_score.

The OCR formula is checked with a fake recogniser; the real RapidOCR engine
reads a few texts from dataset/ocr test prompts rendered black on white.
"""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from advantage_weighted_matching import rewards
from advantage_weighted_matching.rewards import (
    REWARDS,
    images_to_uint8_hwc,
    multi_score,
    resolve_reward_config,
    reward_config_defaults,
    run_chunks,
    validate_reward_names,
)
from advantage_weighted_matching.rewards.ocr import make_ocr_scorer, ocr_reward_from_lines, target_text

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)


def _expected_jpeg_reward(image_chw01):
    """Independent reference: uint8 via numpy, PIL JPEG q95, -(bytes/1000)/500."""
    array = np.clip(np.round(image_chw01.numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return -(len(buffer.getvalue()) / 1000) / 500


# ---- registry / config --------------------------------------------------------------------------


def test_registry_names_and_validation():
    # the reference release's multi_score names, plus jpeg_incompressibility and the CPU toys' rewards
    reference = {"deqa", "ocr", "imagereward", "pickscore", "qwenvl", "aesthetic", "jpeg_compressibility",
                 "unifiedreward", "geneval"}
    assert set(REWARDS) == reference | {"jpeg_incompressibility", "brightness", "shapes", "scenes"}
    validate_reward_names(["ocr", "geneval"])
    with pytest.raises(ValueError) as error:
        validate_reward_names(["ocr", "aesthetics"])
    assert "aesthetics" in str(error.value) and "pickscore" in str(error.value)


def test_validation_imports_no_heavy_module():
    code = (
        "import sys\n"
        "from advantage_weighted_matching.rewards import validate_reward_names\n"
        "validate_reward_names(['geneval', 'ocr', 'pickscore', 'jpeg_compressibility'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'rapidocr_onnxruntime', 'Levenshtein') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_reward_config_resolution():
    import ml_collections

    assert resolve_reward_config(None) == reward_config_defaults()
    given = ml_collections.ConfigDict({"batch_size": 4, "dtype": "bfloat16", "device": "cpu"})
    resolved = resolve_reward_config(given)
    assert resolved["batch_size"] == 4 and resolved["dtype"] == "bfloat16" and resolved["device"] == "cpu"
    assert resolved["pickscore_model"] == "yuvalkirstain/PickScore_v1"
    with pytest.raises(ValueError, match="dtype"):
        resolve_reward_config({"dtype": "float64"})


def test_run_chunks_retries_a_failing_chunk_item_by_item(caplog):
    calls = []

    def square_unless_three(start, stop):  # item 3 always fails, so does any chunk holding it
        calls.append((start, stop))
        if start <= 3 < stop:
            raise RuntimeError("bad image")
        return [i * i for i in range(start, stop)]

    with caplog.at_level("WARNING"):
        results, failed = run_chunks(square_unless_three, 7, 3, "toy")
    assert results == [0, 1, 4, None, 16, 25, 36]
    assert failed.tolist() == [False, False, False, True, False, False, False]
    # chunks [0,3) [3,6) [6,7); only the failing chunk is retried, one item at a time
    assert calls == [(0, 3), (3, 6), (3, 4), (4, 5), (5, 6), (6, 7)]
    assert "toy failed on image 3" in caplog.text


def test_images_to_uint8_hwc_rounds_and_transposes():
    images = torch.tensor([0.0, 0.2, 1.0, 1.5, -0.1, 0.5]).reshape(1, 3, 1, 2)
    out = images_to_uint8_hwc(images)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 3)
    # channel c of pixel (0, w) = images[0, c, 0, w]
    assert out[0, 0].tolist() == [[0, 255, 0], [51, 255, 128]]
    gray = images_to_uint8_hwc(torch.full((2, 1, 3, 3), 0.2))
    assert gray.shape == (2, 3, 3, 3) and (gray == 51).all()


# ---- JPEG -----------------------------------------------------------------------------------


def test_jpeg_compressibility_matches_formula_and_orders_images():
    generator = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.4)
    noise = torch.rand((1, 3, 64, 64), generator=generator)
    images = torch.cat([flat, noise])
    fn = REWARDS["jpeg_compressibility"]("cpu", None)
    scores, info = fn(images, ["a", "b"], [{}, {}])
    assert scores.shape == (2,) and scores.dtype == np.float64
    assert info == {"num_failures": 0}
    assert scores[0] == pytest.approx(_expected_jpeg_reward(flat[0]), abs=0)
    assert scores[1] == pytest.approx(_expected_jpeg_reward(noise[0]), abs=0)
    assert scores[1] < scores[0] < 0  # noise compresses worse


def test_jpeg_incompressibility_is_the_size_in_kb():
    generator = torch.Generator().manual_seed(2)
    images = torch.cat([torch.full((1, 3, 48, 48), 0.7), torch.rand((1, 3, 48, 48), generator=generator)])
    scores, info = REWARDS["jpeg_incompressibility"]("cpu", None)(images, ["a", "b"], [{}, {}])
    assert info == {"num_failures": 0}
    for image, score in zip(images, scores):
        array = np.clip(np.round(image.numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        assert score == len(buffer.getvalue()) / 1000  # kB, positive, no /500
        assert score == pytest.approx(-500 * _expected_jpeg_reward(image), abs=1e-12)  # = -500 x compressibility
    assert scores[1] > scores[0] > 0


def test_multi_score_weighted_sum_and_unknown_name():
    images = torch.rand((3, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    single = REWARDS["jpeg_compressibility"]("cpu", None)(images, ["x"] * 3, [{}] * 3)[0]
    fn = multi_score("cpu", {"jpeg_compressibility": 2.5})
    result, info = fn(images, ["x"] * 3, [{}] * 3)
    assert set(result) == {"jpeg_compressibility", "avg"}
    np.testing.assert_array_equal(result["jpeg_compressibility"], single)
    np.testing.assert_allclose(result["avg"], 2.5 * single, rtol=0, atol=1e-15)
    assert info["num_failures"] == 0
    with pytest.raises(ValueError, match="nope"):
        multi_score("cpu", {"jpeg_compressibility": 1.0, "nope": 1.0})


# ---- OCR formula (fake recogniser) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, target, expected",
    [
        ([("The HELLO World sign", 0.9)], "Hello World", 1.0),  # substring after lowercasing / dropping spaces
        ([("helo world", 0.8)], "hello world", 1 - 1 / 10),  # one deletion over len("helloworld") = 10
        ([("HELLO", 0.9), ("wor ld", 0.7)], "Hello World", 1.0),  # lines concatenated
        ([("hello", 0.9), ("world", 0.0)], "Hello World", 1 - 5 / 10),  # confidence 0 dropped
        ([("x" * 40, 0.9)], "abc", 0.0),  # distance 40 capped at len 3
        ([("abd", 0.9)], "abc", 1 - 1 / 3),
        (None, "abc", 0.0),  # no text found
        ([], "abc", 0.0),
    ],
)
def test_ocr_reward_formula(lines, target, expected):
    assert ocr_reward_from_lines(lines, target) == pytest.approx(expected, abs=1e-12)


def test_ocr_target_is_first_quoted_text():
    assert target_text('A sign reading "Open Late" and "Closed"') == "Open Late"
    with pytest.raises(ValueError):
        target_text("no quotes here")


def test_ocr_failures_cost_only_their_image(monkeypatch, caplog):
    calls = []

    def fake_recognizer(image):
        calls.append(int(image[0, 0, 0]))
        if image[0, 0, 0] == 255:  # the white image "crashes" the engine
            raise RuntimeError("engine exploded")
        return [("stop here", 0.95)]

    def fake_factory(device, reward_config):
        return make_ocr_scorer(device, reward_config, recognizer=fake_recognizer)

    monkeypatch.setitem(rewards.REWARDS, "ocr", fake_factory)
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8), torch.zeros(3, 8, 8)])
    prompts = ['a sign "Stop Here"', 'a sign "Stop Here"', "a prompt without a quoted target"]
    fn = multi_score("cpu", {"ocr": 1.0, "jpeg_compressibility": 0.0})
    with caplog.at_level("WARNING"):
        result, info = fn(images, prompts, [{}] * 3)
    np.testing.assert_array_equal(result["ocr"], [1.0, 0.0, 0.0])
    assert info["num_failures"] == 2
    assert "engine exploded" in caplog.text and "without a quoted target" in caplog.text
    np.testing.assert_array_equal(result["avg"], [1.0, 0.0, 0.0])


def test_multi_score_survives_a_reward_that_raises_on_the_batch(monkeypatch):
    def broken_factory(device, reward_config):
        def score(images, prompts, metadata, only_strict=True):
            raise RuntimeError("reward model unavailable")

        return score

    monkeypatch.setitem(rewards.REWARDS, "pickscore", broken_factory)
    fn = multi_score("cpu", {"pickscore": 1.0, "jpeg_compressibility": 1.0})
    images = torch.zeros(2, 3, 16, 16)
    result, info = fn(images, ["a", "b"], [{}, {}])
    np.testing.assert_array_equal(result["pickscore"], [0.0, 0.0])
    np.testing.assert_array_equal(result["avg"], result["jpeg_compressibility"])
    assert info["num_failures"] == 2


# ---- OCR with the real engine ---------------------------------------------------------------------


def _font(size):
    for path in FONT_CANDIDATES:
        if Path(path).exists():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _render(text, size=512):
    """Black text on white, font shrunk until the text fits with a margin -> NCHW [0, 1]."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font_size = 44
    while font_size > 12 and draw.textlength(text, font=_font(font_size)) > size - 40:
        font_size -= 2
    draw.text((20, size // 2 - font_size // 2), text, fill="black", font=_font(font_size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr_prompts():
    path = SHARED_DATASETS / "ocr" / "test.txt"
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets directory {SHARED_DATASETS} is absent")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.count('"') >= 2]
    return prompts[:3]


@pytest.fixture(scope="module")
def real_ocr():
    pytest.importorskip("rapidocr_onnxruntime")
    return REWARDS["ocr"]("cpu", None)


def test_real_ocr_reads_exact_renderings(real_ocr, ocr_prompts):
    images = torch.stack([_render(target_text(prompt)) for prompt in ocr_prompts])
    scores, info = real_ocr(images, ocr_prompts, [{}] * len(ocr_prompts))
    assert info["num_failures"] == 0
    assert (scores >= 0.9).all(), (scores, ocr_prompts)


def test_real_ocr_partial_blank_and_noise(real_ocr, ocr_prompts):
    prompt = ocr_prompts[0]
    words = target_text(prompt).split()
    partial = " ".join(words[: max(1, len(words) // 2)])
    noise = torch.rand((3, 512, 512), generator=torch.Generator().manual_seed(0))
    images = torch.stack([_render(partial), torch.ones(3, 512, 512), noise])
    scores, info = real_ocr(images, [prompt] * 3, [{}] * 3)
    assert info["num_failures"] == 0
    assert 0.0 < scores[0] < 1.0, (scores, partial)
    assert scores[1] == 0.0 and scores[2] == 0.0


def test_prefetch_dry_run_names_the_weights_of_every_model_reward():
    script = Path(__file__).resolve().parents[1] / "setup" / "prefetch_reward_weights.py"
    names = "aesthetic,imagereward,qwenvl,deqa,unifiedreward,jpeg_incompressibility"
    output = subprocess.run([sys.executable, str(script), "--rewards", names, "--dry-run"], capture_output=True,
                            text=True, check=True).stdout
    defaults = reward_config_defaults()
    for expected in (defaults["aesthetic_head"], defaults["aesthetic_clip"], "THUDM/ImageReward/ImageReward.pt",
                     "THUDM/ImageReward/med_config.json", defaults["imagereward_tokenizer"], defaults["qwenvl_model"]):
        assert f"would download {expected}" in output
