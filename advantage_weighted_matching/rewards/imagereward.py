"""ImageReward (the reference's ``imagereward``; THUDM/ImageReward v1.0), on transformers' BLIP classes.

The reference calls the ``ImageReward`` pip package, which needs torchvision
and timm (torchvision does not import beside this project's torch). The
model is small enough to rebuild exactly:

* vision: BLIP's ViT-L/16 at 224 px (pre-norm blocks, fused qkv, final
  LayerNorm, eps 1e-6) = ``transformers.BlipVisionModel``; its
  ``last_hidden_state`` [b, 1 + 196, 1024] (class token first) is the image
  embedding;
* text: BLIP's BERT (``med_config.json``, every layer with cross-attention to
  the image embedding) = ``transformers.BlipTextModel`` without pooler, called
  as an encoder (bidirectional mask) with ``encoder_hidden_states`` = the image
  embedding and an all-ones image mask;
* head: ``mlp_head.LinearMLPHead`` 768 -> 1024 -> 128 -> 64 -> 16 -> 1 on the
  text encoder's first ([CLS]) output token.

``reward = (head(text_cls) - 0.16717362830052426) / 1.0333394966054072``
(ImageReward's normalisation; scale: roughly standard-normal over its
training prompts, SD images mostly in [-2, 2]). Preprocessing as ImageReward:
resize the short side to 224 (PIL bicubic), centre crop 224, [0, 1], CLIP
mean / std; prompt tokenised by BLIP's BERT tokenizer (bert-base-uncased plus
``[DEC]`` / ``[ENC]``) padded to 35 tokens with truncation. The reference
scores one (prompt, image) pair per call; pairs are batched here, which changes
nothing (no interaction between pairs in eval mode).

Weights: ``ImageReward.pt`` (a state dict in BLIP's own names) and
``med_config.json`` from ``reward_config['imagereward_model']`` (hub repo or
local directory), renamed onto the transformers modules by
``convert_state_dict``; every parameter must be covered. The vision geometry
(width, depth, patch, image size) is read from the checkpoint's shapes; heads
= width / 64 (BLIP's ViT-B and ViT-L both use 64-d heads).
"""

import json
import logging
import math
import re

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import from_pretrained_or_explain, image_text_reward, resolve_device, score_image_text_chunks, torch_dtype
from .mlp_head import head_from_state_dict
from .weight_files import hub_or_dir_file

logger = logging.getLogger(__name__)

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
MAX_TEXT_TOKENS = 35
VIT_HEAD_DIM = 64
VIT_LAYER_NORM_EPS = 1e-6
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

_VISION_RENAMES = [  # BLIP ViT name (after "blip.visual_encoder.") -> BlipVisionModel name
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]


def _rename_vision(key):
    for pattern, replacement in _VISION_RENAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


def convert_state_dict(state_dict):
    """ImageReward.pt state dict -> (vision, text, head) state dicts in transformers' /
    LinearMLPHead names, plus the list of ignored keys (BLIP's unused projections, buffers)."""
    vision, text, head, ignored = {}, {}, {}, []
    for key, value in state_dict.items():
        renamed = _rename_vision(key[len("blip.visual_encoder."):]) if key.startswith("blip.visual_encoder.") else None
        if renamed:
            vision[renamed] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith(".position_ids"):
            text[key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            head[key[len("mlp."):]] = value
        else:
            ignored.append(key)
    return vision, text, head, ignored


def vision_config_from(vision_state_dict):
    """BlipVisionConfig matching the ViT in the checkpoint (shapes -> geometry)."""
    from transformers import BlipVisionConfig

    width = vision_state_dict["embeddings.class_embedding"].shape[-1]
    patch_size = vision_state_dict["embeddings.patch_embedding.weight"].shape[-1]
    num_patches = vision_state_dict["embeddings.position_embedding"].shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches or width % VIT_HEAD_DIM:
        raise ValueError(f"ImageReward checkpoint: unexpected ViT geometry (width {width}, {num_patches} patches)")
    depth = 1 + max(int(key.split(".")[2]) for key in vision_state_dict if key.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=vision_state_dict["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=width // VIT_HEAD_DIM, image_size=side * patch_size,
        patch_size=patch_size, hidden_act="gelu", layer_norm_eps=VIT_LAYER_NORM_EPS, attention_dropout=0.0,
    )


def text_config_from(med_config, encoder_width):
    """BlipTextConfig from ImageReward's med_config.json (BERT with cross-attention in every layer)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        encoder_hidden_size=encoder_width, intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"], num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"], hidden_act=med_config["hidden_act"],
        layer_norm_eps=med_config["layer_norm_eps"], pad_token_id=med_config.get("pad_token_id", 0),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True,  # is_decoder: build cross-attention
    )


class ImageRewardModel(nn.Module):
    """``model(pixel_values [b, 3, S, S], input_ids [b, L], attention_mask [b, L]) -> reward [b]``."""

    def __init__(self, vision_config, text_config, head):
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = head

    def forward(self, pixel_values, input_ids, attention_mask):
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # [b, 1 + N, W]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text_cls = self.text(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state[:, 0].float()  # [b, D]
        return (self.head(text_cls)[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def load_imagereward(checkpoint_path, med_config_path):
    """ImageRewardModel (float32, eval) from ImageReward.pt and med_config.json."""
    with open(med_config_path, encoding="utf-8") as handle:
        med_config = json.load(handle)
    state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    vision_sd, text_sd, head_sd, ignored = convert_state_dict(state_dict)
    if ignored:
        logger.info("ImageReward: %d checkpoint entries unused for scoring (e.g. %s)", len(ignored), ignored[:3])
    vision_config = vision_config_from(vision_sd)
    head = head_from_state_dict(head_sd, f"ImageReward head in {checkpoint_path}")
    model = ImageRewardModel(vision_config, text_config_from(med_config, vision_config.hidden_size), head)
    for module, weights, what in ((model.vision, vision_sd, "vision"), (model.text, text_sd, "text")):
        missing, unexpected = module.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"ImageReward {what} weights in {checkpoint_path} do not fit: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False)


def load_blip_tokenizer(tokenizer_id):
    """BLIP's tokenizer: BERT uncased plus bos ``[DEC]`` and the extra special token ``[ENC]``."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, tokenizer_id)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def imagereward_pixels(image_uint8, size):
    """uint8 [H, W, 3] -> float32 [3, size, size]: short side to ``size`` (PIL bicubic, long side
    ``int(size * long / short)``), centre crop (offsets rounded), /255, CLIP mean/std."""
    image = Image.fromarray(image_uint8)
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size != image.size:
        image = image.resize(new_size, Image.BICUBIC)
    left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return ((array - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


class ImageRewardScorer:
    """``scorer.score_batch(images NCHW [0,1], prompts) -> (scores float64 [B], num_failures)``."""

    def __init__(self, device, reward_config):
        self.device = torch.device(resolve_device(device, reward_config))
        self.batch_size = reward_config["batch_size"]
        source = reward_config["imagereward_model"]
        what = "imagereward (rewards.imagereward_model)"
        model = load_imagereward(hub_or_dir_file(source, CHECKPOINT_FILE, what),
                                 hub_or_dir_file(source, MED_CONFIG_FILE, what))
        self.dtype = torch_dtype(reward_config["dtype"])
        model.vision.to(self.dtype)
        model.text.to(self.dtype)
        self.model = model.to(self.device)  # the head stays float32, fed .float() features as the reference
        self.image_size = model.vision.config.image_size
        self.tokenizer = load_blip_tokenizer(reward_config["imagereward_tokenizer"])

    @torch.no_grad()
    def score_chunk(self, images_uint8, prompts):
        pixels = torch.from_numpy(np.stack([imagereward_pixels(image, self.image_size) for image in images_uint8]))
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                return_tensors="pt")
        rewards = self.model(pixels.to(self.device, self.dtype), tokens["input_ids"].to(self.device),
                             tokens["attention_mask"].to(self.device))
        return rewards.cpu().double().numpy()

    def score_batch(self, images, prompts):
        return score_image_text_chunks(self.score_chunk, images, prompts, self.batch_size, "imagereward")


def make_imagereward_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    return image_text_reward(ImageRewardScorer(device, reward_config))
