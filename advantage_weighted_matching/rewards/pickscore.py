"""PickScore reward (SPEC section 6).

``score = logit_scale.exp() * cos(image_embedding, text_embedding) / 26`` with
the CLIP-H processor (``reward_config['pickscore_processor']``) and the
PickScore CLIP model (``reward_config['pickscore_model']``); both embeddings
are the projected CLIP features, L2-normalised. Images: NCHW float [0, 1] ->
uint8 -> PIL -> processor (resize, centre crop, normalise) -> pixel_values
[b, 3, S, S]; prompts tokenised with padding and truncation to 77 tokens.
Batches of ``reward_config['batch_size']``.
"""

import logging

import torch
from PIL import Image

from . import from_pretrained_or_explain, image_text_reward, resolve_device, score_image_text_chunks, torch_dtype

logger = logging.getLogger(__name__)

PICKSCORE_DIVISOR = 26.0
MAX_TEXT_TOKENS = 77


def projected_features(output):
    """CLIP ``get_*_features`` result -> projected embedding tensor [b, D].
    transformers 5 returns an output object whose ``pooler_output`` is the
    projected embedding; older versions return the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def load_clip(model_id, processor_id, device, dtype_name):
    """(CLIPModel in eval mode on ``device``, processor) through from_pretrained."""
    from transformers import AutoProcessor, CLIPModel

    processor = from_pretrained_or_explain(AutoProcessor.from_pretrained, processor_id)
    model = from_pretrained_or_explain(CLIPModel.from_pretrained, model_id, dtype=torch_dtype(dtype_name))
    model = model.to(device).eval().requires_grad_(False)
    return model, processor


class PickScoreScorer:
    """``scorer(images NCHW [0,1], prompts) -> scores float64 [B]``."""

    def __init__(self, device, reward_config):
        self.device = torch.device(resolve_device(device, reward_config))
        self.batch_size = reward_config["batch_size"]
        self.model, self.processor = load_clip(
            reward_config["pickscore_model"], reward_config["pickscore_processor"], self.device, reward_config["dtype"]
        )
        self.model_dtype = next(self.model.parameters()).dtype

    @torch.no_grad()
    def score_chunk(self, images_uint8, prompts):
        """Scores of one chunk: uint8 [b, H, W, 3] and b prompts -> float64 [b]."""
        pil_images = [Image.fromarray(image) for image in images_uint8]
        image_inputs = self.processor(images=pil_images, return_tensors="pt")
        text_inputs = self.processor(
            text=list(prompts), padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )
        pixel_values = image_inputs["pixel_values"].to(self.device, self.model_dtype)
        image_embeddings = projected_features(self.model.get_image_features(pixel_values=pixel_values)).float()
        text_embeddings = projected_features(
            self.model.get_text_features(
                input_ids=text_inputs["input_ids"].to(self.device),
                attention_mask=text_inputs["attention_mask"].to(self.device),
            )
        ).float()
        image_embeddings = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)
        text_embeddings = text_embeddings / text_embeddings.norm(dim=-1, keepdim=True)
        cosine = (image_embeddings * text_embeddings).sum(dim=-1)  # [b]
        scores = self.model.logit_scale.float().exp() * cosine / PICKSCORE_DIVISOR
        return scores.cpu().double().numpy()

    def score_batch(self, images, prompts):
        """Batched scores; a failing chunk is retried image by image so that a bad
        image costs only itself. Returns (scores float64 [B], num_failures)."""
        return score_image_text_chunks(self.score_chunk, images, prompts, self.batch_size, "pickscore")


def make_pickscore_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    return image_text_reward(PickScoreScorer(device, reward_config))
