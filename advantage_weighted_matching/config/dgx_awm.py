"""The six SD3.5-Medium AWM presets of SPEC section 1, the three Flow-GRPO
baseline presets of SPEC section 7, and three AWM presets for FLUX.1-dev.

Select with ``--config advantage_weighted_matching/config/dgx_awm.py:PRESET``.
Each preset is a plain function over ``base_awm.get_config()``; the process
count in its name is the one its batch plan is sized for (8 or 32 GPUs; the
Flow-GRPO presets 32, as Flow-GRPO's own SD3 configs).
"""

import ml_collections

from advantage_weighted_matching.config import base_awm
from advantage_weighted_matching.paths import dataset_dir


def _sd3_no_cfg_common(num_gpus):
    """Values shared by every SD3.5 preset (SPEC section 1)."""
    config = base_awm.get_config()
    config.pretrained.model = "stabilityai/stable-diffusion-3.5-medium"
    config.resolution = 512
    config.mixed_precision = "fp16"
    config.num_epochs = 100000
    config.per_prompt_stat_tracking = True

    config.sample.num_steps = 14
    config.sample.eval_num_steps = 40
    config.sample.guidance_scale = 1.0
    config.sample.train_batch_size = 6
    config.sample.num_image_per_prompt = 24
    config.sample.test_batch_size = 6
    config.sample.sde_frac = 0.0
    config.sample.global_std = True

    train = config.train
    train.num_inner_epochs = 1
    train.train_timesteps = 6
    train.kl_weight = "Uniform"
    train.advantage_max = 1.0
    train.ema = True
    train.timestep_fraction = 0.9
    train.loss_type = "exp_first"
    train.learning_rate = 3e-4
    train.weighting = "ghuber"
    train.ghuber_power = 0.25
    train.kl_ema_weight = "Uniform"
    train.kl_ema_decay = 0.3
    train.ema_beta = 1.0
    train.kl_ema_decay_type = "linear"
    train.off_policy = False
    train.use_sa_solver = True
    train.clip_range = 1.0
    train.decay_steps = 1e10
    train.ema_decay = 0.99
    train.ema_update_step_interval = 1
    # top level, under the reference's names
    config.lora_type = "attn"
    config.time_shift = 3.0
    return base_awm.one_step_per_epoch(config)


def _set_batches(config, num_gpus, num_groups):
    """num_batches_per_epoch = num_groups * k // num_gpus // 2 (SPEC table). train.num_batches_per_epoch
    and train.gradient_accumulation_steps follow (base_awm): one optimizer step per epoch."""
    k = config.sample.num_image_per_prompt
    config.sample.num_batches_per_epoch = num_groups * k // num_gpus // 2


def _geneval(num_gpus, suffix):
    config = _sd3_no_cfg_common(num_gpus)
    config.dataset = dataset_dir("geneval")
    config.prompt_fn = "geneval"
    config.reward_fn = ml_collections.ConfigDict({"geneval": 1.0})
    config.sample.noise_level = 0.4
    config.train.batch_size = 3
    config.train.beta = 0.001
    config.time_type = "discrete_wo_init"
    config.save_freq = config.eval_freq = 50
    config.run_name = f"geneval_sd3_no_cfg_{suffix}"
    _set_batches(config, num_gpus, num_groups=24)
    return config


def _ocr(num_gpus, suffix):
    config = _sd3_no_cfg_common(num_gpus)
    config.dataset = dataset_dir("ocr")
    config.prompt_fn = "general_ocr"
    config.reward_fn = ml_collections.ConfigDict({"ocr": 1.0})
    config.sample.noise_level = 0.4
    config.train.batch_size = 3
    config.train.beta = 0.003
    config.time_type = "discrete_wo_init"
    config.save_freq = config.eval_freq = 20
    config.run_name = f"ocr_sd3_no_cfg_{suffix}"
    _set_batches(config, num_gpus, num_groups=24)
    return config


def _pickscore(num_gpus, suffix):
    config = _sd3_no_cfg_common(num_gpus)
    config.dataset = dataset_dir("pickscore")
    config.prompt_fn = "general_ocr"
    config.reward_fn = ml_collections.ConfigDict({"pickscore": 1.0})
    config.sample.noise_level = 0.0
    config.train.batch_size = 2
    config.train.beta = 0.0001
    config.time_type = "discrete"
    config.save_freq = config.eval_freq = 50
    config.run_name = f"pickscore_sd3_no_cfg_{suffix}"
    _set_batches(config, num_gpus, num_groups=8)
    return config


def _flux(reward, num_gpus=8):
    """AWM on FLUX.1-dev, 8 GPUs. The reference release has no FLUX settings; each choice and its
    reason is listed in the README ("FLUX.1-dev presets"). Everything not set here is the SD3.5
    preset's value for the same reward (the method's settings), so the two backbones compare."""
    config = {"geneval": _geneval, "ocr": _ocr, "pickscore": _pickscore}[reward](num_gpus, "1node")
    config.pretrained.model = "black-forest-labs/FLUX.1-dev"
    config.pretrained.backbone = "flux"
    config.mixed_precision = "bf16"  # FLUX.1 is a bf16 model; fp16 activations overflow in it
    config.max_sequence_length = 512  # FLUX.1-dev's T5 length (its text tokens are never masked)
    config.sample.guidance_scale = 3.5  # the distilled guidance value, a model input (no CFG pass)
    config.sample.eval_num_steps = 28  # FluxPipeline's default step count
    config.train.gradient_checkpointing = True  # 12B parameters: the micro-batch must fit one 80 GB GPU
    config.run_name = f"{reward}_flux_1node"
    return config


def geneval_flux_1node():
    return _flux("geneval")


def ocr_flux_1node():
    return _flux("ocr")


def pickscore_flux_1node():
    return _flux("pickscore")


def _flow_grpo_sd3(dataset, prompt_fn, reward, beta, test_batch_size):
    """Flow-GRPO's published SD3.5-Medium settings (its config/grpo.py, SPEC 7), 32 GPUs: SDE
    rollouts of 10 steps at noise 0.7 with CFG 4.5 (also in training), 9 images per GPU and
    batch, groups of 24, 48 groups per epoch, every step j < int(10 * 0.99) = 9 trained, two
    optimizer steps per epoch, ratio clip 1e-4, advantages clipped at 5, KL in mean space."""
    num_gpus, num_groups = 32, 48
    config = base_awm.get_config()
    config.pretrained.model = "stabilityai/stable-diffusion-3.5-medium"
    config.dataset = dataset_dir(dataset)
    config.prompt_fn = prompt_fn
    config.reward_fn = ml_collections.ConfigDict({reward: 1.0})
    config.resolution = 512
    config.mixed_precision = "fp16"
    config.num_epochs = 100000
    config.save_freq = config.eval_freq = 60
    config.per_prompt_stat_tracking = True
    config.run_name = f"flow_grpo_{reward}_sd3"

    sample = config.sample
    sample.num_steps = 10
    sample.eval_num_steps = 40
    sample.guidance_scale = 4.5
    sample.train_batch_size = 9
    sample.num_image_per_prompt = 24
    sample.num_batches_per_epoch = num_groups * 24 // (num_gpus * 9)  # 48 / (32 * 9 / 24) = 4
    sample.test_batch_size = test_batch_size
    sample.noise_level = 0.7
    sample.sde_frac = 1.0  # every rollout step is stochastic
    sample.global_std = True

    train = config.train
    train.algorithm = "flow_grpo"
    train.use_sa_solver = False
    train.cfg = True
    train.batch_size = sample.get_ref("train_batch_size")  # one rollout batch per micro-batch
    train.gradient_accumulation_steps = sample.get_ref("num_batches_per_epoch") // 2  # two optimizer steps per epoch
    train.num_inner_epochs = 1
    train.timestep_fraction = 0.99
    train.learning_rate = 3e-4
    train.clip_range = 1e-4
    train.adv_clip_max = 5.0
    train.advantage_max = 0.0
    train.beta = beta
    train.ema_beta = 0.0
    train.off_policy = False
    train.ema = True
    train.ema_decay = 0.9  # Flow-GRPO's EMAModuleWrapper(decay=0.9, update_step_interval=8)
    train.ema_update_step_interval = 8
    train.decay_steps = 1e10  # constant learning rate in effect, as Flow-GRPO
    config.lora_type = "attn"
    return config


def flow_grpo_geneval_sd3():
    return _flow_grpo_sd3("geneval", "geneval", "geneval", beta=0.04, test_batch_size=14)


def flow_grpo_ocr_sd3():
    return _flow_grpo_sd3("ocr", "general_ocr", "ocr", beta=0.04, test_batch_size=16)


def flow_grpo_pickscore_sd3():
    return _flow_grpo_sd3("pickscore", "general_ocr", "pickscore", beta=0.01, test_batch_size=16)


def geneval_sd3_no_cfg_1node():
    return _geneval(8, "1node")


def geneval_sd3_no_cfg_4nodes():
    return _geneval(32, "4nodes")


def ocr_sd3_no_cfg_1node():
    return _ocr(8, "1node")


def ocr_sd3_no_cfg_4nodes():
    return _ocr(32, "4nodes")


def pickscore_sd3_no_cfg_1node():
    return _pickscore(8, "1node")


def pickscore_sd3_no_cfg_4nodes():
    return _pickscore(32, "4nodes")


PRESETS = {
    f.__name__: f
    for f in (
        geneval_sd3_no_cfg_1node,
        geneval_sd3_no_cfg_4nodes,
        ocr_sd3_no_cfg_1node,
        ocr_sd3_no_cfg_4nodes,
        pickscore_sd3_no_cfg_1node,
        pickscore_sd3_no_cfg_4nodes,
        flow_grpo_geneval_sd3,
        flow_grpo_ocr_sd3,
        flow_grpo_pickscore_sd3,
        geneval_flux_1node,
        ocr_flux_1node,
        pickscore_flux_1node,
    )
}
# The GPU count each preset's batch plan is sized for.
PRESET_NUM_PROCESSES = {name: 32 if name.endswith("4nodes") or name.startswith("flow_grpo") else 8 for name in PRESETS}


def get_config(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
