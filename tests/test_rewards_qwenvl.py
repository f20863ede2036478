"""qwenvl (Qwen2.5-VL judge in process): the answer -> score rule by hand, the
image resize rule, and end-to-end generate calls on a tiny random
Qwen2_5_VLForConditionalGeneration built from a config, saved, and loaded back
through from_pretrained.

The tiny model's weights are random except for a few entries that make its
greedy answer known: one residual dimension is a constant 10 in every token
embedding and nothing writes to it (those rows of o_proj and down_proj are
zero), the final norm reads only that dimension and lm_head maps it to one
token. So the model answers that token at every step, whatever the image and
prompt, and the test picks the token: the added word ``<Score>4</Score>`` or
the end-of-turn token (an empty answer).
"""

import numpy as np
import pytest
import torch

from advantage_weighted_matching.rewards import REWARDS
from advantage_weighted_matching.rewards.qwenvl import QWENVL_TASK, score_from_answer, smart_resize

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# The Qwen2.5-VL chat layout for one user turn of [image, text] with the default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ANSWER_WORD = "<Score>4</Score>"
CONSTANT_DIM = 5


@pytest.mark.parametrize("answer, expected", [
    ("<Thought>\nSharp, vivid.\n</Thought>\n<Score>4</Score>", 0.8),
    ("<Score>5</Score>", 1.0),
    ("<Score>1</Score>", 0.2),
    ("<Score>2</Score> on reflection <Score>5</Score>", 0.4),  # the first one counts
    ("<Score>10</Score>", 2.0),  # digits are not clamped (the reference's rule)
    ("<Score>07</Score>", 1.4),
    ("<Score> 4</Score>", None),
    ("<Score>4.5</Score>", None),
    ("Score: 4", None),
    ("<score>4</score>", None),
    ("", None),
])
def test_score_from_answer(answer, expected):
    assert score_from_answer(answer) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("size, expected", [
    ((512, 512), (504, 504)),  # SD3 at 512: round(512 / 28) = 18 -> 504
    ((56, 56), (56, 56)),
    ((64, 64), (56, 56)),
    ((32, 32), (56, 56)),  # below 4 x 28 x 28 pixels: grown to the minimum
    ((768, 512), (756, 504)),
    ((4000, 4000), (3584, 3584)),  # 128 x 128 patches = 16384 x 28 x 28 pixels, the maximum
])
def test_smart_resize(size, expected):
    assert smart_resize(*size) == expected


def build_tiny_qwenvl(directory, answer_token):
    """Tiny Qwen2.5-VL + tokenizer + image processor in ``directory``; the model always answers
    ``answer_token`` (a token string). Returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    byte_level = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                      merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS, model_max_length=8192,
                                        chat_template=CHAT_TEMPLATE)
    tokenizer.add_tokens([ANSWER_WORD])  # an ordinary (not special) token: decoding keeps it
    tokenizer.save_pretrained(str(directory))
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64).save_pretrained(str(directory))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
            rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, tie_word_embeddings=False,
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    text = model.model.language_model
    with torch.no_grad():
        text.embed_tokens.weight[:, CONSTANT_DIM] = 10.0
        for layer in text.layers:
            layer.self_attn.o_proj.weight[CONSTANT_DIM] = 0.0
            layer.mlp.down_proj.weight[CONSTANT_DIM] = 0.0
        text.norm.weight.zero_()
        text.norm.weight[CONSTANT_DIM] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(answer_token), CONSTANT_DIM] = 1.0
    model.save_pretrained(str(directory))
    return str(directory)


def _config(model_dir, **overrides):
    config = {"qwenvl_model": model_dir, "qwenvl_dtype": "float32", "qwenvl_max_new_tokens": 3, "batch_size": 4}
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def scoring_judge(tmp_path_factory):
    return build_tiny_qwenvl(tmp_path_factory.mktemp("qwenvl_score"), ANSWER_WORD)


def test_end_to_end_generate_parses_the_judges_answer(scoring_judge):
    fn = REWARDS["qwenvl"]("cpu", _config(scoring_judge))
    scorer = fn.scorer
    assert scorer.prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{QWENVL_TASK}<|im_end|>\n<|im_start|>assistant\n"
    )
    seen = {}

    def record_prompt(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # the prefill step, not the one-token decoding steps
            seen["input_ids"] = kwargs["input_ids"].clone()

    def record_vision(module, args, kwargs):
        seen["pixel_values"], seen["image_grid_thw"] = args[0].clone(), kwargs["grid_thw"].clone()

    hooks = [scorer.model.register_forward_pre_hook(record_prompt, with_kwargs=True),
             scorer.model.model.visual.register_forward_pre_hook(record_vision, with_kwargs=True)]
    images = torch.rand((3, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    try:
        scores, info = fn(images, ["a cat", "a dog", "a car"], [{}] * 3)
    finally:
        for hook in hooks:
            hook.remove()
    np.testing.assert_array_equal(scores, [0.8, 0.8, 0.8])  # "<Score>4</Score>..." -> 4 / 5
    assert scores.dtype == np.float64 and info == {"num_failures": 0}
    # 64 px -> smart_resize 56 px -> 4 x 4 patches of 14, merged 2 x 2 -> 4 image tokens per prompt
    assert seen["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
    assert seen["pixel_values"].shape == (3 * 16, 3 * 2 * 14 * 14)
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    resized = [Image.fromarray(image).resize((56, 56), Image.BICUBIC) for image in uint8]  # as qwen_vl_utils
    expected = Qwen2VLImageProcessorPil.from_pretrained(scoring_judge)(images=resized, return_tensors="pt")
    torch.testing.assert_close(seen["pixel_values"], expected["pixel_values"])
    image_pad = scorer.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (seen["input_ids"] == image_pad).sum(dim=1).tolist() == [4, 4, 4]
    answers = scorer.score_batch(images[:1])[2]
    assert answers == [ANSWER_WORD * 3]  # max_new_tokens 3, special tokens skipped


def test_chunks_of_the_batch_give_the_same_scores(scoring_judge):
    images = torch.rand((3, 3, 56, 56), generator=torch.Generator().manual_seed(1))
    one = REWARDS["qwenvl"]("cpu", _config(scoring_judge, batch_size=1))(images, ["a"] * 3, [{}] * 3)[0]
    np.testing.assert_array_equal(one, [0.8, 0.8, 0.8])


def test_an_answer_without_a_score_is_zero_and_counted(tmp_path, caplog):
    judge = build_tiny_qwenvl(tmp_path / "silent", "<|im_end|>")  # ends its turn at once: empty answer
    fn = REWARDS["qwenvl"]("cpu", _config(judge))
    with caplog.at_level("WARNING"):
        scores, info = fn(torch.rand((2, 3, 56, 56)), ["a", "b"], [{}, {}])
    np.testing.assert_array_equal(scores, [0.0, 0.0])
    assert info == {"num_failures": 2}
    assert "no <Score>N</Score>" in caplog.text
