"""CPU preset: the full AWM loop on a tiny random SD3 (no download, no GPU).

    accelerate launch --num_processes 1 advantage_weighted_matching/scripts/train_sd3_awm.py \
        --config advantage_weighted_matching/config/tiny_awm.py:tiny_cpu

Same code path as the SD3.5 presets (SA-Solver rollouts, ghuber-weighted AWM
loss, KL to the base model and to the KL-EMA adapter, weight-EMA), scaled down
to 32x32 images and a few epochs. The tiny pipeline is built on first use in
the cache dir (`AWM_CACHE_DIR`, default ~/.cache/advantage_weighted_matching).
"""

import os

import ml_collections

from advantage_weighted_matching.config import base_awm
from advantage_weighted_matching.paths import cache_dir, dataset_dir


def tiny_cpu():
    config = base_awm.get_config()
    config.run_name = "tiny_cpu"
    config.pretrained.model = os.path.join(cache_dir(), "tiny-sd3-seed0")
    config.pretrained.tiny_seed = 0
    config.dataset = dataset_dir("tiny_text")
    config.prompt_fn = "general_ocr"
    config.reward_fn = ml_collections.ConfigDict({"jpeg_compressibility": 1.0})
    config.mixed_precision = "no"
    config.resolution = 32
    config.num_epochs = 4
    config.save_freq = 2
    config.eval_freq = 2
    config.log_image_freq = 2
    config.num_checkpoint_limit = 2

    config.sample.num_steps = 6
    config.sample.eval_num_steps = 6
    config.sample.guidance_scale = 1.0
    config.sample.train_batch_size = 4
    config.sample.num_image_per_prompt = 4
    config.sample.test_batch_size = 4
    config.sample.num_batches_per_epoch = 2
    config.sample.noise_level = 0.4
    config.sample.sde_frac = 0.0
    config.sample.global_std = True
    config.sample.num_eval_images = 8
    config.time_type = "discrete_wo_init"

    train = config.train
    train.batch_size = 2
    train.learning_rate = 1e-3
    train.train_timesteps = 2
    train.timestep_fraction = 0.9
    train.weighting = "ghuber"
    train.ghuber_power = 0.25
    train.loss_type = "exp_first"
    train.clip_range = 1.0
    train.advantage_max = 1.0
    train.beta = 0.001
    train.ema = True
    train.ema_beta = 1.0
    train.kl_ema_decay = 0.3
    train.use_sa_solver = True
    train.lora_rank = 4
    train.lora_alpha = 8
    return base_awm.one_step_per_epoch(config)


def tiny_cpu_sde():
    """The tiny preset with SDE rollouts instead of the SA-Solver."""
    config = tiny_cpu()
    config.run_name = "tiny_cpu_sde"
    config.train.use_sa_solver = False
    config.sample.sde_frac = 1.0
    return config


def tiny_cpu_flow_grpo():
    """The Flow-GRPO baseline on the tiny pipeline (SPEC 7 rules): SDE rollouts, every step
    j < int(6 * 0.99) = 5 trained, one rollout batch per micro-batch, two optimizer steps per epoch."""
    config = tiny_cpu_sde()
    config.run_name = "tiny_cpu_flow_grpo"
    config.train.algorithm = "flow_grpo"
    config.sample.noise_level = 0.7
    config.train.batch_size = config.sample.get_ref("train_batch_size")
    config.train.gradient_accumulation_steps = config.sample.get_ref("num_batches_per_epoch") // 2
    config.train.timestep_fraction = 0.99
    config.train.clip_range = 1e-4
    config.train.beta = 0.04
    config.train.ema_beta = 0.0
    return config


def tiny_cpu_flux():
    """The tiny preset on a tiny random FLUX.1-dev-shaped pipeline (packed latents, guidance
    embedding, dynamic shift): the same AWM loop through the FLUX backbone."""
    config = tiny_cpu()
    config.run_name = "tiny_cpu_flux"
    config.pretrained.model = os.path.join(cache_dir(), "tiny-flux-seed0")
    config.pretrained.backbone = "flux"
    config.sample.guidance_scale = 3.5  # FLUX.1-dev's distilled guidance, a model input
    config.max_sequence_length = 32
    return config


def tiny_cpu_brightness():
    """The tiny preset rewarded by mean image brightness: a toy task whose reward
    spread lets a few CPU epochs show learning (tests/test_learning.py)."""
    config = tiny_cpu()
    config.run_name = "tiny_cpu_brightness"
    config.reward_fn = ml_collections.ConfigDict({"brightness": 1.0})
    config.num_epochs = 12
    # The random tiny VAE ends in a GroupNorm that all but removes global
    # brightness from the latents' reach, and 8 images make a noisy gradient:
    # a larger step (lr, LoRA scale) and no pull towards the lagging KL-EMA
    # adapter let 12 optimizer steps show the direction of learning.
    config.train.learning_rate = 3e-2
    config.train.lora_alpha = 32
    config.train.ema_beta = 0.0
    config.eval_freq = 0
    config.log_image_freq = 0
    config.save_freq = 0
    return config


PRESETS = {
    "tiny_cpu": tiny_cpu, "tiny_cpu_sde": tiny_cpu_sde, "tiny_cpu_flow_grpo": tiny_cpu_flow_grpo,
    "tiny_cpu_brightness": tiny_cpu_brightness, "tiny_cpu_flux": tiny_cpu_flux,
}


def get_config(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
