"""The backbone seam (issue K): SD3 and FLUX behind one interface, checked against the
diffusers pipelines' own code paths on tiny random models saved and loaded with
`from_pretrained`."""

import pytest
import torch

from advantage_weighted_matching.backbones import SD3, Flux, get_backbone, image_ids, pack_latents, unpack_latents
from advantage_weighted_matching.rollout import rollout


@pytest.fixture(scope="session")
def flux_pipeline(tiny_flux_dir):
    return Flux.load_pipeline(str(tiny_flux_dir), "main", torch.float32, "cpu")


def test_get_backbone():
    assert get_backbone("sd3") is SD3 and get_backbone("flux") is Flux
    with pytest.raises(ValueError, match="pretrained.backbone='sdxl'"):
        get_backbone("sdxl")


def test_pack_unpack_match_flux_pipeline_layout():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8), rtol=0, atol=0)
    assert packed.shape == (2, 3 * 4, 16)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x, rtol=0, atol=0)
    # token (row 1, column 2) holds the 2x2 patch x[:, :, 2:4, 4:6], channel-major
    torch.testing.assert_close(packed[:, 1 * 4 + 2].view(2, 4, 2, 2), x[:, :, 2:4, 4:6], rtol=0, atol=0)
    ids = image_ids(6, 8, "cpu")
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    assert ids[1 * 4 + 2].tolist() == [0.0, 1.0, 2.0]


def test_flux_sigmas_are_the_pipelines_shifted_grid(flux_pipeline):
    import copy

    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = copy.deepcopy(flux_pipeline.scheduler)
    config = scheduler.config
    # The tiny VAE downsamples 2x (FLUX.1's 8x): 128 px -> 64 latent -> 32 x 32 = 1024 packed tokens, as
    # FLUX.1 at 512 px. mu = 0.5 + (1024 - 256) * 0.65 / 3840 = 0.63
    assert flux_pipeline.vae_scale_factor == 2
    mu = calculate_shift(1024, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    assert mu == pytest.approx(0.63)
    retrieve_timesteps(scheduler, 10, "cpu", sigmas=np.linspace(1.0, 0.1, 10), mu=mu)
    ours = Flux.sigmas(flux_pipeline, 10, 128)
    torch.testing.assert_close(ours, scheduler.sigmas.double(), rtol=1e-6, atol=1e-7)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and len(ours) == 11
    # by hand, the exponential shift: sigma' = e^mu / (e^mu + 1/sigma - 1); sigma = 0.5 -> e^0.63 / (e^0.63 + 1)
    import math
    half = Flux.sigmas(flux_pipeline, 2, 128)[1].item()
    assert half == pytest.approx(math.exp(0.63) / (math.exp(0.63) + 1), rel=1e-6)
    # the shift grows with the resolution
    assert Flux.sigmas(flux_pipeline, 10, 256)[5] > ours[5]
    with pytest.raises(ValueError, match="resolution"):
        Flux.sigmas(flux_pipeline, 10)


def test_flux_ode_rollout_equals_flux_pipeline(flux_pipeline):
    # FluxPipeline.__call__ integrates the same ODE with Euler steps; our rollout through the
    # backbone (prompt encoding, start noise, packing, timestep and guidance conventions, grid)
    # must give the same final latents and images.
    pipe = flux_pipeline
    prompts = ["a red cube", "two blue balls"]
    embeds, pooled = Flux.encode_prompts(pipe, prompts, "cpu", max_sequence_length=32)
    sigmas = Flux.sigmas(pipe, 4, 32)
    ours = rollout(pipe, pipe.transformer, embeds, pooled, sigmas, 32, torch.Generator().manual_seed(3),
                   use_sa_solver=False, deterministic=True, guidance_scale=3.5, backbone=Flux)
    theirs = pipe(prompts, height=32, width=32, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=32,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    torch.testing.assert_close(pack_latents(ours.latents[-1]), theirs, rtol=1e-4, atol=1e-5)
    assert ours.images.shape == (2, 3, 32, 32) and 0 <= ours.images.min() and ours.images.max() <= 1


def test_flux_velocity_reads_the_guidance_value(flux_pipeline):
    pipe = flux_pipeline
    embeds, pooled = Flux.encode_prompts(pipe, ["a cat"], "cpu", max_sequence_length=16)
    x = Flux.initial_noise(pipe, 1, 32, "cpu", torch.Generator().manual_seed(0))
    assert x.shape == (1, 4, 16, 16)
    with torch.no_grad():
        a = Flux.velocity(pipe.transformer, x, 0.7, embeds, pooled, guidance_scale=3.5)
        b = Flux.velocity(pipe.transformer, x, 0.7, embeds, pooled, guidance_scale=1.0)
        c = Flux.velocity(pipe.transformer, x, torch.tensor([0.7]), embeds, pooled, guidance_scale=3.5)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(a, c, rtol=0, atol=0)  # float and tensor times agree
    assert not Flux.uses_cfg(3.5) and SD3.uses_cfg(4.5) and not SD3.uses_cfg(1.0)
