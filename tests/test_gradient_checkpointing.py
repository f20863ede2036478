"""train.gradient_checkpointing: the same loss and LoRA gradients as without it (issue I.2, the
CPU half; its memory and time are device measurements), on the tiny SD3 and FLUX transformers."""

import pytest
import torch

from advantage_weighted_matching.backbones import SD3, Flux
from advantage_weighted_matching.lora import adapter_parameters, add_lora, lora_config
from advantage_weighted_matching.objective import awm_loss


def _loss_and_grads(backbone, pipeline_dir, checkpointing):
    pipeline = backbone.load_pipeline(str(pipeline_dir), "main", torch.float32, "cpu")
    if checkpointing:
        pipeline.transformer.enable_gradient_checkpointing()
    torch.manual_seed(0)  # the gaussian LoRA init draws from the global generator
    model = add_lora(pipeline.transformer, lora_config(4, 8, "gaussian", "attn", backbone), False)
    model.train()
    params = adapter_parameters(model, "default")
    with torch.no_grad():  # LoRA B starts at 0: move it so every LoRA weight gets a gradient
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    embeds, pooled = backbone.encode_prompts(pipeline, ["a red cube", "a cat"], "cpu", 16)
    clean = backbone.initial_noise(pipeline, 2, 32, "cpu", torch.Generator().manual_seed(1))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.8])

    def v(x, t):
        return backbone.velocity(model, x, t, embeds, pooled, guidance_scale=3.5, dtype=torch.float32)

    loss, _ = awm_loss(v, clean, noise, t, torch.tensor([1.0, -0.5]), 1, weighting="ghuber")
    loss.backward()
    return loss.item(), [p.grad.clone() for p in params], pipeline.transformer.gradient_checkpointing


@pytest.mark.parametrize("backbone", [SD3, Flux], ids=["sd3", "flux"])
def test_checkpointing_keeps_loss_and_gradients(backbone, tiny_sd3_dir, tiny_flux_dir):
    pipeline_dir = tiny_sd3_dir if backbone is SD3 else tiny_flux_dir
    loss, grads, off = _loss_and_grads(backbone, pipeline_dir, False)
    loss_ckpt, grads_ckpt, on = _loss_and_grads(backbone, pipeline_dir, True)
    assert on and not off
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert any(g.abs().max() > 0 for g in grads)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-7)
