"""Example rewards from your own module (README: "Rewards from your own module").

Use them by name in ``config.reward_fn``; a ConfigDict key cannot hold ``.``,
so write the module path with ``/``:

    config.reward_fn = ml_collections.ConfigDict({"examples/my_rewards:saturation": 1.0})
    --config.reward_fn='{"examples/my_rewards:clip_similarity": 1.0, "pickscore": 0.5}'

Both kinds the trainer accepts are shown:

* ``saturation``: a plain scoring function ``(images, prompts, metadata) -> scores``,
  called on every batch;
* ``clip_similarity``: a factory ``(device, reward_config) -> fn`` that loads a
  model once; its settings come from ``config.rewards.custom_options``.

Contract: ``images`` NCHW float in [0, 1] on the training device, ``prompts``
list[str] of length B, ``metadata`` list[dict] of length B; return B real
numbers (list, numpy array or tensor [B]) or ``(scores, info)`` with
``info["num_failures"]`` the images you could not score (give them 0).
"""

import torch


def saturation(images, prompts, metadata):
    """Mean HSV saturation per image, in [0, 1]: ``(max_c - min_c) / max_c`` per pixel
    (0 for black pixels), averaged over the pixels. Returns a float tensor [B]."""
    del prompts, metadata
    brightest, darkest = images.amax(dim=1), images.amin(dim=1)  # [B, H, W]
    per_pixel = torch.where(brightest > 0, (brightest - darkest) / brightest.clamp_min(1e-12),
                            torch.zeros_like(brightest))
    return per_pixel.mean(dim=(1, 2))


def clip_similarity(device, reward_config):
    """Factory: CLIP cosine similarity between each image and its prompt, in [-1, 1].

    ``config.rewards.custom_options.clip_model`` names the CLIP model (hub id or
    local directory; default ``openai/clip-vit-base-patch32``). The model loads
    here, once; the returned function scores a batch and reports failures.
    """
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model_id = reward_config["custom_options"].get("clip_model", "openai/clip-vit-base-patch32")
    model = CLIPModel.from_pretrained(model_id).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model_id)

    @torch.no_grad()
    def score(images, prompts, metadata):
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
        inputs = processor(text=list(prompts), images=pil_images, padding=True, truncation=True,
                           max_length=77, return_tensors="pt").to(device)
        image_embeddings = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_embeddings = model.get_text_features(input_ids=inputs["input_ids"],
                                                  attention_mask=inputs["attention_mask"]).pooler_output
        cosine = torch.nn.functional.cosine_similarity(image_embeddings, text_embeddings, dim=-1)
        failed = ~torch.isfinite(cosine)
        return torch.where(failed, torch.zeros_like(cosine), cosine).cpu(), {"num_failures": int(failed.sum())}

    return score
