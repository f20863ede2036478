"""aesthetic (CLIP + LAION MLP head) and imagereward (BLIP + MLP head) on tiny random models.

aesthetic: a tiny CLIP built, saved and loaded through from_pretrained, and a
tiny random head saved with torch.save (the released head is never
committed); expected = the head's affine chain applied by hand to
CLIPModel.forward's normalised image embedding.

imagereward: a tiny checkpoint in ImageReward.pt's own (BLIP) parameter names
plus med_config.json and a BERT vocabulary, loaded through the real loader
(rename onto transformers' BLIP classes); expected = an independent forward
pass written here with plain torch ops on the original names (ViT pre-norm
blocks, BERT post-norm layers with cross-attention, [CLS] -> head ->
(r - mean) / std).
"""

import json
import math
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rewards_pickscore import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, build_tiny_clip  # noqa: E402

from advantage_weighted_matching.rewards import REWARDS, multi_score  # noqa: E402
from advantage_weighted_matching.rewards.imagereward import (  # noqa: E402
    IMAGEREWARD_MEAN, IMAGEREWARD_STD, imagereward_pixels,
)
from advantage_weighted_matching.rewards.mlp_head import head_from_state_dict  # noqa: E402
from advantage_weighted_matching.rewards.weight_files import cached_path_for_url  # noqa: E402

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def random_head_state(in_features, seed, widths=(32, 8, 8, 4, 1)):
    """State dict of a random linear MLP head with the released layout (layers 0, 2, 4, 6, 7)."""
    generator = torch.Generator().manual_seed(seed)
    state, previous = {}, in_features
    for index, width in zip((0, 2, 4, 6, 7), widths):
        state[f"layers.{index}.weight"] = torch.randn((width, previous), generator=generator) / math.sqrt(previous)
        state[f"layers.{index}.bias"] = torch.randn((width,), generator=generator) * 0.1
        previous = width
    return state


def apply_head_by_hand(state, features):
    """The head as the affine chain it is in eval mode (dropout off, no activations)."""
    for index in (0, 2, 4, 6, 7):
        features = features @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return features[:, 0]


# ---- aesthetic ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aesthetic_setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("aesthetic")
    clip_dir = build_tiny_clip(directory / "clip", seed=2)
    head_state = random_head_state(16, seed=3)  # tiny CLIP projection_dim = 16 (the real one: 768)
    torch.save(head_state, directory / HEAD_FILE)
    return {"aesthetic_clip": clip_dir, "aesthetic_head": str(directory / HEAD_FILE), "batch_size": 2}, head_state


def expected_aesthetic(clip_dir, head_state, images):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = np.round(images.numpy().astype(np.float64) * 255) / 255  # the uint8 round trip
    pixels = (pixels - CLIP_MEAN[None, :, None, None]) / CLIP_STD[None, :, None, None]
    tokens = CLIPTokenizer.from_pretrained(clip_dir)(["x"] * len(images), return_tensors="pt")
    with torch.no_grad():
        output = model(pixel_values=torch.from_numpy(pixels).float(), **tokens)
    return apply_head_by_hand(head_state, output.image_embeds).numpy()  # image_embeds: projected, L2-normalised


def test_aesthetic_is_the_head_on_the_normalised_clip_embedding(aesthetic_setup):
    config, head_state = aesthetic_setup
    images = torch.rand((5, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(4))
    scores, info = REWARDS["aesthetic"]("cpu", config)(images, ["p"] * 5, [{}] * 5)
    assert scores.shape == (5,) and scores.dtype == np.float64 and info == {"num_failures": 0}
    np.testing.assert_allclose(scores, expected_aesthetic(config["aesthetic_clip"], head_state, images),
                               rtol=0, atol=1e-5)
    assert np.ptp(scores) > 1e-3


def test_aesthetic_head_downloads_once_into_the_cache(aesthetic_setup, tmp_path, monkeypatch):
    config, head_state = aesthetic_setup
    monkeypatch.setenv("AWM_CACHE_DIR", str(tmp_path / "cache"))
    served = Path(config["aesthetic_head"]).parent
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/sac%2Blogos%2Bava1-l14-linearMSE.pth"
    try:
        fn = REWARDS["aesthetic"]("cpu", {**config, "aesthetic_head": url})
    finally:
        server.shutdown()
        server.server_close()
    cached = Path(cached_path_for_url(url))
    assert cached == tmp_path / "cache" / "reward_weights" / HEAD_FILE and cached.is_file()
    fn_again = REWARDS["aesthetic"]("cpu", {**config, "aesthetic_head": url})  # server gone: the cache serves it
    images = torch.rand((2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(fn(images, ["a", "b"], [{}, {}])[0], fn_again(images, ["a", "b"], [{}, {}])[0])


def test_aesthetic_bad_head_files(aesthetic_setup, tmp_path):
    config, _ = aesthetic_setup
    with pytest.raises(RuntimeError, match=r"rewards.aesthetic_head.*does not exist"):
        REWARDS["aesthetic"]("cpu", {**config, "aesthetic_head": str(tmp_path / "missing.pth")})
    torch.save(random_head_state(24, seed=0), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="takes 24-d embeddings but .* gives 16-d"):
        REWARDS["aesthetic"]("cpu", {**config, "aesthetic_head": str(tmp_path / "wide.pth")})
    with pytest.raises(ValueError, match="do not chain"):
        head_from_state_dict({"layers.0.weight": torch.zeros(4, 3), "layers.0.bias": torch.zeros(4),
                              "layers.2.weight": torch.zeros(1, 5), "layers.2.bias": torch.zeros(1)}, "head")


# ---- imagereward --------------------------------------------------------------------------------------

VIT_WIDTH, VIT_DEPTH, VIT_MLP, PATCH, PIXELS = 128, 2, 256, 8, 32  # 2 heads of 64 (BLIP's head width)
TEXT_WIDTH, TEXT_DEPTH, TEXT_HEADS, TEXT_MLP, TEXT_POSITIONS = 32, 2, 2, 64, 40
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "on", "the", "mat", "photo", "of",
         "blue", "car", "two", "sitting"]


def build_tiny_imagereward(directory, seed=0):
    """ImageReward.pt (BLIP names), med_config.json and a BERT tokenizer dir. Returns (model dir, tokenizer dir,
    state dict)."""
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = directory / "bert"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=512).save_pretrained(str(tokenizer_dir))
    vocab_size = len(WORDS) + 2  # + [DEC] and [ENC], as BLIP's tokenizer
    med_config = {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": TEXT_WIDTH, "initializer_range": 0.02,
        "intermediate_size": TEXT_MLP, "layer_norm_eps": 1e-12, "max_position_embeddings": TEXT_POSITIONS,
        "model_type": "bert", "num_attention_heads": TEXT_HEADS, "num_hidden_layers": TEXT_DEPTH, "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": 768, "add_cross_attention": True,
    }
    (directory / "med_config.json").write_text(json.dumps(med_config))
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape, scale=None):
        return torch.randn(shape, generator=generator) * (scale if scale else 1 / math.sqrt(shape[-1]))

    def layer_norm(prefix, width):
        state[f"{prefix}.weight"] = 1 + 0.1 * torch.randn((width,), generator=generator)
        state[f"{prefix}.bias"] = 0.1 * torch.randn((width,), generator=generator)

    def linear(prefix, out_features, in_features):
        state[f"{prefix}.weight"] = weight(out_features, in_features)
        state[f"{prefix}.bias"] = 0.1 * torch.randn((out_features,), generator=generator)

    state = {}
    v = "blip.visual_encoder"
    num_patches = (PIXELS // PATCH) ** 2
    state[f"{v}.cls_token"] = weight(1, 1, VIT_WIDTH, scale=0.5)
    state[f"{v}.pos_embed"] = weight(1, num_patches + 1, VIT_WIDTH, scale=0.5)
    state[f"{v}.patch_embed.proj.weight"] = weight(VIT_WIDTH, 3, PATCH, PATCH, scale=1 / math.sqrt(3 * PATCH * PATCH))
    state[f"{v}.patch_embed.proj.bias"] = 0.1 * torch.randn((VIT_WIDTH,), generator=generator)
    for i in range(VIT_DEPTH):
        layer_norm(f"{v}.blocks.{i}.norm1", VIT_WIDTH)
        linear(f"{v}.blocks.{i}.attn.qkv", 3 * VIT_WIDTH, VIT_WIDTH)
        linear(f"{v}.blocks.{i}.attn.proj", VIT_WIDTH, VIT_WIDTH)
        layer_norm(f"{v}.blocks.{i}.norm2", VIT_WIDTH)
        linear(f"{v}.blocks.{i}.mlp.fc1", VIT_MLP, VIT_WIDTH)
        linear(f"{v}.blocks.{i}.mlp.fc2", VIT_WIDTH, VIT_MLP)
    layer_norm(f"{v}.norm", VIT_WIDTH)
    t = "blip.text_encoder"
    state[f"{t}.embeddings.word_embeddings.weight"] = weight(vocab_size, TEXT_WIDTH, scale=1.0)
    state[f"{t}.embeddings.position_embeddings.weight"] = weight(TEXT_POSITIONS, TEXT_WIDTH, scale=0.5)
    state[f"{t}.embeddings.position_ids"] = torch.arange(TEXT_POSITIONS)[None]  # a buffer the loader skips
    layer_norm(f"{t}.embeddings.LayerNorm", TEXT_WIDTH)
    for i in range(TEXT_DEPTH):
        layer = f"{t}.encoder.layer.{i}"
        for block, key_width in (("attention", TEXT_WIDTH), ("crossattention", VIT_WIDTH)):
            linear(f"{layer}.{block}.self.query", TEXT_WIDTH, TEXT_WIDTH)
            linear(f"{layer}.{block}.self.key", TEXT_WIDTH, key_width)
            linear(f"{layer}.{block}.self.value", TEXT_WIDTH, key_width)
            linear(f"{layer}.{block}.output.dense", TEXT_WIDTH, TEXT_WIDTH)
            layer_norm(f"{layer}.{block}.output.LayerNorm", TEXT_WIDTH)
        linear(f"{layer}.intermediate.dense", TEXT_MLP, TEXT_WIDTH)
        linear(f"{layer}.output.dense", TEXT_WIDTH, TEXT_MLP)
        layer_norm(f"{layer}.output.LayerNorm", TEXT_WIDTH)
    linear("blip.vision_proj", 16, VIT_WIDTH)  # in the checkpoint, unused for scoring
    linear("blip.text_proj", 16, TEXT_WIDTH)
    state.update({f"mlp.{key}": value for key, value in random_head_state(TEXT_WIDTH, seed=seed + 1).items()})
    torch.save(state, directory / "ImageReward.pt")
    return str(directory), str(tokenizer_dir), state


def _attention(query, key, value, heads, additive_mask=None):
    """Scaled dot-product attention over ``heads`` heads: [b, Lq, D], [b, Lk, D] -> [b, Lq, D]."""
    b, lq, d = query.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(query) @ split(key).transpose(-1, -2) / math.sqrt(d // heads)
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ split(value)).transpose(1, 2).reshape(b, lq, d)


def reference_imagereward(state, pixels, input_ids, attention_mask):
    """ImageReward's forward written from BLIP's architecture on the checkpoint's own names."""
    s = state
    linear = lambda x, name: x @ s[f"{name}.weight"].T + s[f"{name}.bias"]  # noqa: E731
    norm = lambda x, name, eps: F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], eps)  # noqa: E731
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, s[f"{v}.patch_embed.proj.weight"], s[f"{v}.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([s[f"{v}.cls_token"].expand(len(pixels), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + s[f"{v}.pos_embed"]
    for i in range(VIT_DEPTH):
        block = f"{v}.blocks.{i}"
        h = norm(x, f"{block}.norm1", 1e-6)
        q, k, value = linear(h, f"{block}.attn.qkv").chunk(3, dim=-1)  # qkv rows: all q, then all k, then all v
        x = x + linear(_attention(q, k, value, VIT_WIDTH // 64), f"{block}.attn.proj")
        x = x + linear(F.gelu(linear(norm(x, f"{block}.norm2", 1e-6), f"{block}.mlp.fc1")), f"{block}.mlp.fc2")
    image_embeds = norm(x, f"{v}.norm", 1e-6)
    t = "blip.text_encoder"
    positions = torch.arange(input_ids.shape[1])
    h = (s[f"{t}.embeddings.word_embeddings.weight"][input_ids]
         + s[f"{t}.embeddings.position_embeddings.weight"][positions])
    h = norm(h, f"{t}.embeddings.LayerNorm", 1e-12)
    padding = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # BERT's extended mask
    for i in range(TEXT_DEPTH):
        layer = f"{t}.encoder.layer.{i}"
        a = f"{layer}.attention"
        attended = _attention(linear(h, f"{a}.self.query"), linear(h, f"{a}.self.key"), linear(h, f"{a}.self.value"),
                              TEXT_HEADS, padding)
        h = norm(linear(attended, f"{a}.output.dense") + h, f"{a}.output.LayerNorm", 1e-12)
        c = f"{layer}.crossattention"
        attended = _attention(linear(h, f"{c}.self.query"), linear(image_embeds, f"{c}.self.key"),
                              linear(image_embeds, f"{c}.self.value"), TEXT_HEADS)  # every image token attended
        h = norm(linear(attended, f"{c}.output.dense") + h, f"{c}.output.LayerNorm", 1e-12)
        hidden = F.gelu(linear(h, f"{layer}.intermediate.dense"))
        h = norm(linear(hidden, f"{layer}.output.dense") + h, f"{layer}.output.LayerNorm", 1e-12)
    head = {key[len("mlp."):]: value for key, value in s.items() if key.startswith("mlp.")}
    return (apply_head_by_hand(head, h[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


@pytest.fixture(scope="module")
def imagereward_setup(tmp_path_factory):
    model_dir, tokenizer_dir, state = build_tiny_imagereward(tmp_path_factory.mktemp("imagereward"))
    return {"imagereward_model": model_dir, "imagereward_tokenizer": tokenizer_dir, "batch_size": 2}, state


def test_imagereward_equals_an_independent_blip_forward(imagereward_setup):
    from transformers import AutoTokenizer

    config, state = imagereward_setup
    images = torch.rand((4, 3, PIXELS, PIXELS), generator=torch.Generator().manual_seed(8))
    prompts = ["a red cat", "two dogs sitting on the mat", "a blue car", "a photo of a red car on the mat " * 6]
    fn = REWARDS["imagereward"]("cpu", config)
    scores, info = fn(images, prompts, [{}] * 4)
    assert scores.shape == (4,) and scores.dtype == np.float64 and info == {"num_failures": 0}

    pixels = np.round(images.numpy().astype(np.float64) * 255) / 255  # 32 px already: no resize, no crop
    pixels = (pixels - CLIP_MEAN[None, :, None, None]) / CLIP_STD[None, :, None, None]
    tokenizer = AutoTokenizer.from_pretrained(config["imagereward_tokenizer"])
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (4, 35) and tokens["attention_mask"][3].all()  # the long one truncated
    with torch.no_grad():
        expected = reference_imagereward(state, torch.from_numpy(pixels).float(), tokens["input_ids"],
                                         tokens["attention_mask"]).numpy()
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
    assert np.ptp(scores) > 1e-2  # prompts and images move the reward


def test_imagereward_in_multi_score_and_batching(imagereward_setup):
    config, _ = imagereward_setup
    images = torch.rand((3, 3, PIXELS, PIXELS), generator=torch.Generator().manual_seed(9))
    prompts = ["a cat", "a dog", "a red car"]
    one = REWARDS["imagereward"]("cpu", {**config, "batch_size": 1})(images, prompts, [{}] * 3)[0]
    result, info = multi_score("cpu", {"imagereward": 0.5}, {**config, "batch_size": 3})(images, prompts, [{}] * 3)
    np.testing.assert_allclose(result["imagereward"], one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result["avg"], 0.5 * result["imagereward"], atol=1e-12)


def test_imagereward_preprocessing_resizes_the_short_side_and_centre_crops():
    square = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = (square.astype(np.float32) / 255 - CLIP_MEAN.astype(np.float32)) / CLIP_STD.astype(np.float32)
    np.testing.assert_allclose(imagereward_pixels(square, 32), expected.transpose(2, 0, 1), atol=1e-6)
    wide = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # H 40, W 48
    # short side 40 -> 32: width int(32 * 48 / 40) = 38; crop left round((38 - 32) / 2) = 3, top 0
    resized = np.asarray(Image.fromarray(wide).resize((38, 32), Image.BICUBIC), dtype=np.float32)[:, 3:35]
    expected = (resized / 255 - CLIP_MEAN.astype(np.float32)) / CLIP_STD.astype(np.float32)
    np.testing.assert_allclose(imagereward_pixels(wide, 32), expected.transpose(2, 0, 1), atol=1e-6)


def test_imagereward_missing_files_and_mismatched_checkpoint(imagereward_setup, tmp_path):
    config, state = imagereward_setup
    with pytest.raises(RuntimeError, match="ImageReward.pt is missing from"):
        REWARDS["imagereward"]("cpu", {**config, "imagereward_model": str(tmp_path)})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "med_config.json").write_text(Path(config["imagereward_model"], "med_config.json").read_text())
    torch.save({k: v for k, v in state.items() if "crossattention" not in k}, broken / "ImageReward.pt")
    with pytest.raises(ValueError, match="ImageReward text weights .* do not fit: missing"):
        REWARDS["imagereward"]("cpu", {**config, "imagereward_model": str(broken)})
