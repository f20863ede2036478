"""PickScore reward (SPEC section 6) with a tiny random CLIP built and saved locally,
loaded back through the same from_pretrained path as the real weights."""

import json

import numpy as np
import pytest
import torch

from advantage_weighted_matching.rewards import REWARDS, multi_score

IMAGE_SIZE = 32
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _byte_alphabet():
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def build_tiny_clip(directory, seed=0):
    """Tiny random CLIPModel + CLIPProcessor saved under ``directory`` (model and processor
    in the same folder, as an HF repo would hold them). Returns the directory as str."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = _byte_alphabet()
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
    vocab = {}
    for token in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(directory))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=16,
        logit_scale_init_value=3.0,
    )
    CLIPModel(config).eval().save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _reward_config(clip_dir, **overrides):
    config = {"pickscore_model": clip_dir, "pickscore_processor": clip_dir, "batch_size": 2}
    config.update(overrides)
    return config


def _reference_scores(clip_dir, images, prompts):
    """Independent PickScore: hand-normalised pixels, CLIPModel.forward's logits_per_image."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    pixels = np.round(images.numpy().astype(np.float64) * 255) / 255  # the uint8 round trip
    pixels = (pixels - CLIP_MEAN[None, :, None, None]) / CLIP_STD[None, :, None, None]
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        output = model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
            pixel_values=torch.from_numpy(pixels).float(),
        )
    # logits_per_image = logit_scale.exp() * (normalised image . normalised text)
    return (output.logits_per_image.diagonal() / 26).numpy()


def test_pickscore_equals_scaled_cosine(tiny_clip_dir):
    generator = torch.Generator().manual_seed(3)
    images = torch.rand((5, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    prompts = ["a red cat", "a dog", "red dog on a mat", "cat", "a very long prompt " * 20]
    fn = REWARDS["pickscore"]("cpu", _reward_config(tiny_clip_dir))
    scores, info = fn(images, prompts, [{}] * 5)
    assert scores.shape == (5,) and scores.dtype == np.float64
    assert info == {"num_failures": 0}
    expected = _reference_scores(tiny_clip_dir, images, prompts)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    # |score| <= exp(3.0) / 26 ~ 0.77 and the scores differ between images
    assert np.all(np.abs(scores) <= np.exp(3.0) / 26 + 1e-6)
    assert np.ptp(scores) > 1e-4


def test_pickscore_batching_and_dtype_do_not_change_scores(tiny_clip_dir):
    images = torch.rand((3, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(4))
    prompts = ["a cat", "a dog", "a red cat"]
    batched = REWARDS["pickscore"]("cpu", _reward_config(tiny_clip_dir, batch_size=16))(images, prompts, [{}] * 3)[0]
    single = REWARDS["pickscore"]("cpu", _reward_config(tiny_clip_dir, batch_size=1))(images, prompts, [{}] * 3)[0]
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)
    bf16 = REWARDS["pickscore"]("cpu", _reward_config(tiny_clip_dir, dtype="bfloat16"))
    assert next(bf16.scorer.model.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(bf16(images, prompts, [{}] * 3)[0], batched, rtol=0, atol=0.05)


def test_pickscore_in_multi_score(tiny_clip_dir):
    images = torch.rand((2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(5))
    fn = multi_score("cpu", {"pickscore": 2.0, "jpeg_compressibility": 1.0}, _reward_config(tiny_clip_dir))
    result, info = fn(images, ["a cat", "a dog"], [{}, {}])
    np.testing.assert_allclose(result["avg"], 2.0 * result["pickscore"] + result["jpeg_compressibility"], atol=1e-12)
    assert info["num_failures"] == 0


def test_missing_model_names_id_and_prefetch_step(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = {"pickscore_model": "no-such-org/no-such-pickscore", "pickscore_processor": "no-such-org/no-such-processor"}
    with pytest.raises(RuntimeError) as error:
        REWARDS["pickscore"]("cpu", config)
    message = str(error.value)
    assert "no-such-org/no-such-processor" in message
    assert "python setup/prefetch_reward_weights.py" in message
