"""CPU toy presets: AWM vs Flow-GRPO on coloured shapes (issue F).

    python -m advantage_weighted_matching.toy.pretrain --out ~/.cache/advantage_weighted_matching/toy-sd3-seed0
    python benchmarks/awm_vs_flow_grpo.py            # builds the assets itself if missing

Both presets start from the same pretrained toy SD3 (32x32 images of 1-3
coloured squares / circles, `advantage_weighted_matching.toy`) and share every
size: the SD3.5 presets scaled down the same way for both (14 -> 10 sampling
steps, groups of 24 -> 8 images, 6 -> 8 images per rollout batch on one
process, micro-batch 3 -> 4, 6 -> 4 training timesteps, LoRA rank 32 -> 8 with
alpha / rank = 2, one optimizer step per epoch, same learning rate). Each keeps
its own published method settings: AWM as in `dgx_awm.py` (SA-Solver with noise
0.4, ghuber weighting, clip 1, KL-EMA, beta 0.001); Flow-GRPO as its release
trains SD3 (SPEC 7: SDE rollouts with noise 0.7 at every step, every step
j < int(num_steps * 0.99) trained, two optimizer steps per epoch, per-step ratios
clipped at 1e-4, mean-space KL with beta 0.04, advantages clipped at 5).
"""

import os

import ml_collections

from advantage_weighted_matching.config import base_awm
from advantage_weighted_matching.paths import cache_dir

TOY_MODEL_DIR = os.path.join(cache_dir(), "toy-sd3-seed0")
TOY_PROMPT_DIR = os.path.join(cache_dir(), "toy-shapes-prompts")


def ensure_toy_assets(minutes=8.0):
    """Pretrain the toy pipeline (once, cached) and write its prompt files; returns the model dir."""
    from advantage_weighted_matching.toy.pretrain import ensure_toy_pipeline
    from advantage_weighted_matching.toy.shapes import write_prompt_files

    if not os.path.exists(os.path.join(TOY_PROMPT_DIR, "test.txt")):
        write_prompt_files(TOY_PROMPT_DIR, n_train=1000, n_test=32, seed=0)
    return ensure_toy_pipeline(TOY_MODEL_DIR, seed=0, minutes=minutes)


def _toy_common():
    from advantage_weighted_matching.toy.pretrain import TOY_MAX_SEQUENCE_LENGTH, TOY_RESOLUTION

    config = base_awm.get_config()
    config.pretrained.model = TOY_MODEL_DIR
    config.dataset = TOY_PROMPT_DIR
    config.prompt_fn = "general_ocr"
    config.reward_fn = ml_collections.ConfigDict({"shapes": 1.0})
    config.mixed_precision = "no"
    config.resolution = TOY_RESOLUTION
    config.max_sequence_length = TOY_MAX_SEQUENCE_LENGTH
    config.num_epochs = 40
    config.save_freq = 0
    config.eval_freq = 5  # the fixed 24-prompt test split is the low-noise learning curve
    config.log_image_freq = 10

    config.sample.num_steps = 10
    config.sample.eval_num_steps = 20
    config.sample.guidance_scale = 1.0
    config.sample.train_batch_size = 8
    config.sample.num_image_per_prompt = 8
    config.sample.test_batch_size = 8
    config.sample.num_batches_per_epoch = 4
    config.sample.num_eval_images = 24  # every prompt of the toy grammar once
    config.sample.global_std = True

    train = config.train
    train.batch_size = 4
    train.train_timesteps = 4
    train.timestep_fraction = 0.9
    train.learning_rate = 3e-3  # one value for both: of 3e-3 and 1e-2 (one seed each), the steadier for both
    train.lora_rank = 8
    train.lora_alpha = 16
    train.ema = False  # the weight-EMA only changes evaluation; the comparison evaluates the policy
    return base_awm.one_step_per_epoch(config)


def toy_awm():
    config = _toy_common()
    config.run_name = "toy_awm"
    config.sample.noise_level = 0.4
    config.sample.sde_frac = 0.0
    config.time_type = "discrete_wo_init"
    train = config.train
    train.algorithm = "awm"
    train.use_sa_solver = True
    train.weighting = "ghuber"
    train.ghuber_power = 0.25
    train.loss_type = "exp_first"
    train.clip_range = 1.0
    train.advantage_max = 1.0
    train.beta = 0.001
    train.ema_beta = 1.0
    train.kl_ema_decay = 0.3
    return config


def toy_flow_grpo():
    """Flow-GRPO by SPEC 7's rules at toy scale: SDE rollouts (noise 0.7, every step), every
    step j < int(num_steps * 0.99) trained, a micro-batch per rollout batch, two optimizer steps
    per epoch, clip 1e-4, advantages clipped at 5, KL in mean space (beta 0.04, its GenEval /
    OCR value). The toy model is trained without prompt dropout, so no CFG here (nor for AWM)."""
    config = _toy_common()
    config.run_name = "toy_flow_grpo"
    config.sample.noise_level = 0.7
    config.sample.sde_frac = 1.0
    train = config.train
    train.algorithm = "flow_grpo"
    train.use_sa_solver = False
    train.batch_size = config.sample.get_ref("train_batch_size")
    train.gradient_accumulation_steps = config.sample.get_ref("num_batches_per_epoch") // 2
    train.timestep_fraction = 0.99
    train.clip_range = 1e-4
    train.adv_clip_max = 5.0
    train.advantage_max = 0.0
    train.beta = 0.04
    train.ema_beta = 0.0
    return config


PRESETS = {"toy_awm": toy_awm, "toy_flow_grpo": toy_flow_grpo}
DESCRIBED_KEYS = (
    "sample.num_steps", "sample.noise_level", "sample.sde_frac", "sample.train_batch_size",
    "sample.num_image_per_prompt", "sample.num_batches_per_epoch", "train.algorithm", "train.use_sa_solver",
    "train.batch_size", "train.train_timesteps", "train.learning_rate", "train.lora_rank", "train.lora_alpha",
    "train.clip_range", "train.beta", "train.ema_beta", "train.weighting", "train.advantage_max",
    "train.adv_clip_max", "time_type",
)


def describe(algorithm):
    """The compared hyperparameters of one preset, as a flat dict (for reports)."""
    config = PRESETS[f"toy_{algorithm}"]()
    described = {}
    for key in DESCRIBED_KEYS:
        value = config
        for part in key.split("."):
            value = value[part]
        described[key] = value
    return described


def get_config(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
