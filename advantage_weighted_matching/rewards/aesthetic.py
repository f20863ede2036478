"""LAION aesthetic reward (the reference's ``aesthetic``; improved-aesthetic-predictor).

``score = head(e / |e|)`` with ``e`` the projected CLIP ViT-L/14 image
embedding [b, 768] (``reward_config['aesthetic_clip']``, model and processor:
resize the short side to 224 bicubic, centre crop 224, CLIP normalisation) and
``head`` the LAION linear MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1
(``mlp_head.py``) loaded from ``sac+logos+ava1-l14-linearMSE.pth``
(``reward_config['aesthetic_head']``: a local path, or a URL downloaded once
into the cache). Scale: the predictor was fitted to 1-10 human ratings; SD
images mostly score 4.5-6.5. Images: NCHW float [0, 1] -> uint8 -> PIL ->
processor, in chunks of ``reward_config['batch_size']``.
"""

import numpy as np
import torch
from PIL import Image

from . import images_to_uint8_hwc, resolve_device, run_chunks
from .mlp_head import load_head
from .pickscore import load_clip, projected_features
from .weight_files import url_or_path_file


class AestheticScorer:
    """``scorer.score_batch(images NCHW [0,1]) -> (scores float64 [B], num_failures)``."""

    def __init__(self, device, reward_config):
        self.device = torch.device(resolve_device(device, reward_config))
        self.batch_size = reward_config["batch_size"]
        clip_id = reward_config["aesthetic_clip"]
        self.model, self.processor = load_clip(clip_id, clip_id, self.device, reward_config["dtype"])
        self.model_dtype = next(self.model.parameters()).dtype
        head_path = url_or_path_file(reward_config["aesthetic_head"], "aesthetic head (rewards.aesthetic_head)")
        self.head = load_head(head_path, f"aesthetic head {head_path}").to(self.device)  # float32, as the reference
        embed_dim = self.model.config.projection_dim
        if self.head.layers[0].in_features != embed_dim:
            raise ValueError(f"aesthetic head {head_path} takes {self.head.layers[0].in_features}-d embeddings but "
                             f"{clip_id} gives {embed_dim}-d ones")

    @torch.no_grad()
    def score_chunk(self, images_uint8):
        """uint8 [b, H, W, 3] -> float64 [b]."""
        pixel_values = self.processor(images=[Image.fromarray(image) for image in images_uint8],
                                      return_tensors="pt")["pixel_values"].to(self.device, self.model_dtype)
        embedding = projected_features(self.model.get_image_features(pixel_values=pixel_values)).float()
        embedding = embedding / torch.linalg.vector_norm(embedding, dim=-1, keepdim=True)
        return self.head(embedding)[:, 0].cpu().double().numpy()

    def score_batch(self, images):
        images_uint8 = images_to_uint8_hwc(images)
        results, failed = run_chunks(lambda start, stop: self.score_chunk(images_uint8[start:stop]),
                                     len(images_uint8), self.batch_size, "aesthetic")
        scores = np.array([0.0 if bad else value for value, bad in zip(results, failed)], dtype=np.float64)
        return scores, int(failed.sum())


def make_aesthetic_scorer(device, reward_config):
    """Factory: ``fn(images, prompts, metadata, only_strict=True) -> (scores [B], info)``."""
    scorer = AestheticScorer(device, reward_config)

    def score(images, prompts, metadata, only_strict=True):
        del prompts, metadata, only_strict
        scores, num_failures = scorer.score_batch(images)
        return scores, {"num_failures": num_failures}

    score.scorer = scorer
    return score
