"""Base configuration: every key the trainer reads, with SPEC section 1 defaults.

Presets (``dgx_awm.py``, ``tiny_awm.py``) are plain functions that start from
``get_config()`` and assign values; the returned config is locked, so a typo in
a preset or on the command line (``--config.train.betta=1``) raises instead of
silently adding a key the trainer never reads.

Key names are the reference release's: ``time_type``, ``time_shift`` and
``lora_type`` sit at the top level, so a line of its published parameter list
(``config.time_type = "discrete_wo_init"``) works unchanged in a preset and as
``--config.time_type=...``. ``train.gradient_accumulation_steps`` and
``train.num_batches_per_epoch`` are derived (SPEC 1) through ml_collections
field references (``one_step_per_epoch`` in the presets): overriding
``sample.num_batches_per_epoch`` or a batch size on the command line updates both.
"""

import ml_collections

# The LAION aesthetic predictor's head (improved-aesthetic-predictor, ViT-L/14, MSE-trained linear MLP).
AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      "sac%2Blogos%2Bava1-l14-linearMSE.pth")


def micro_batches_per_epoch(config):
    """sample.train_batch_size // train.batch_size * sample.num_batches_per_epoch as a lazy
    ml_collections expression: it follows later assignments and command-line overrides."""
    return (config.sample.get_ref("train_batch_size") // config.train.get_ref("batch_size")
            * config.sample.get_ref("num_batches_per_epoch"))


def one_step_per_epoch(config):
    """Accumulate over every micro-batch of the epoch (SPEC 1: the presets' derived
    ``train.gradient_accumulation_steps``); a fresh expression, so assigning it later leaves
    ``train.num_batches_per_epoch`` derived."""
    config.train.gradient_accumulation_steps = micro_batches_per_epoch(config)
    return config


def get_config():
    config = ml_collections.ConfigDict()

    # ---- run / bookkeeping ----
    config.run_name = ""  # wandb run name and run-dir name; "" -> timestamp
    config.wandb_project = "advantage-weighted-matching"  # wandb project
    config.seed = 42  # global seed; prompt sampler uses seed + counter
    config.logdir = "logs"  # root of run directories (relative to cwd)
    config.save_dir = ""  # run directory; "" -> {logdir}/{run_name}
    config.num_epochs = 100  # epochs (one optimizer step each in the presets)
    config.save_freq = 20  # epochs between checkpoints (0 = only at the end)
    config.eval_freq = 100  # epochs between evaluations (0 = never)
    config.log_image_freq = 10  # epochs between logged sample-image grids
    config.num_checkpoint_limit = 5  # checkpoints kept in {save_dir}/checkpoints
    config.mixed_precision = "fp16"  # "no" | "fp16" | "bf16" (accelerate)
    config.allow_tf32 = True  # TF32 matmuls on Ampere+ GPUs
    config.resume_from = ""  # checkpoint dir or run dir (newest checkpoint that verifies)
    config.resume_allow_changes = False  # resume although reward/seed/dataset/... differ (logged; old config kept)
    config.use_lora = True  # train a LoRA adapter (full fine-tuning unsupported)
    config.resolution = 768  # image side in pixels
    config.max_sequence_length = 128  # T5 tokens of the text encoder (SD3 presets 128, FLUX 512)
    config.max_nonfinite_steps = 3  # non-finite losses in a row before abort
    config.dataset = ""  # prompt directory ({split}.txt or {split}_metadata.jsonl)
    config.prompt_fn = "general_ocr"  # "general_ocr" | "geneval" (file format)
    config.reward_fn = ml_collections.ConfigDict({"jpeg_compressibility": 1.0})  # name -> weight
    config.per_prompt_stat_tracking = True  # group advantages by prompt text
    config.time_type = "discrete"  # training times: discrete | discrete_wo_init | discrete_with_init | uniform | logit_normal
    config.time_shift = 3.0  # shift s of the continuous time types (t -> s t / (1 + (s - 1) t))
    config.lora_type = "attn"  # LoRA target modules: "attn" | "ffn"
    config.dump_rank_state = False  # write {save_dir}/rank_state/rank{r}.jsonl each epoch (multi-process tests)
    config.peak_tflops = 989.0  # accelerator's dense fp16/bf16 peak, TFLOP/s, for the logged MFU (H100 SXM: 989)

    # ---- model ----
    config.pretrained = pretrained = ml_collections.ConfigDict()
    pretrained.model = "stabilityai/stable-diffusion-3.5-medium"  # hub id or local dir
    pretrained.backbone = "sd3"  # model family: "sd3" (StableDiffusion3Pipeline) | "flux" (FluxPipeline)
    pretrained.revision = "main"  # hub revision
    pretrained.tiny_seed = -1  # >= 0: build a tiny random SD3 at `model` if missing
    pretrained.toy_recipe = ""  # "scenes" | "scenes_quick": pretrain that toy SD3 at `model` if missing

    # ---- rollout ----
    config.sample = sample = ml_collections.ConfigDict()
    sample.num_steps = 40  # solver steps per training rollout
    sample.eval_num_steps = 40  # ODE steps per evaluation image
    sample.guidance_scale = 4.5  # CFG scale; 1.0 disables CFG
    sample.train_batch_size = 1  # images per rollout batch, per GPU
    sample.num_image_per_prompt = 1  # group size k (images per prompt, all GPUs)
    sample.test_batch_size = 1  # eval images per batch, per GPU
    sample.num_batches_per_epoch = 2  # rollout batches per epoch, per GPU
    sample.global_std = False  # normalise advantages by the std of all rewards
    sample.noise_level = 0.7  # SDE / SA-Solver stochasticity (tau)
    sample.sde_frac = 1.0  # SDE rollouts: fraction of steps that are stochastic
    sample.num_eval_images = 0  # eval prompts per evaluation (0 = whole test split)
    sample.rollout_chunk = 0  # images per solver pass, execution only (0 = train_batch_size; divides images/GPU/epoch)

    # ---- training ----
    config.train = train = ml_collections.ConfigDict()
    train.algorithm = "awm"  # "awm" (this paper) | "flow_grpo" (baseline: per-step SDE likelihood ratios)
    train.batch_size = 1  # samples per micro-batch, per GPU
    train.use_8bit_adam = False  # bitsandbytes AdamW8bit
    train.learning_rate = 3e-4  # peak LR
    train.adam_beta1 = 0.9  # AdamW beta1
    train.adam_beta2 = 0.999  # AdamW beta2
    train.adam_weight_decay = 1e-4  # AdamW decoupled weight decay
    train.adam_epsilon = 1e-8  # AdamW epsilon
    # Derived (SPEC 1): sample.train_batch_size // train.batch_size * sample.num_batches_per_epoch.
    train.num_batches_per_epoch = micro_batches_per_epoch(config)  # micro-batches per epoch, per GPU
    train.gradient_accumulation_steps = 1  # micro-batches per optimizer step, per GPU (presets: one_step_per_epoch)
    train.max_grad_norm = 1.0  # grad-norm clip at each optimizer step
    train.num_inner_epochs = 1  # passes over each epoch's samples
    train.cfg = False  # train with CFG (unused when guidance_scale == 1)
    train.adv_clip_max = 5.0  # advantages clamped to [-adv_clip_max, adv_clip_max]
    train.advantage_max = 0.0  # > 0: rescale clamped advantages to this bound
    train.clip_range = 1e-4  # PPO ratio clip epsilon
    train.timestep_fraction = 1.0  # fraction of solver steps eligible for training
    train.beta = 0.0  # weight of the KL to the base model
    train.lora_path = ""  # saved adapter to start the policy from ("" = fresh)
    train.lora_rank = 32  # LoRA rank r
    train.lora_alpha = 64  # LoRA alpha (scale alpha / r)
    train.lora_init = "gaussian"  # peft init_lora_weights
    train.ema = False  # keep a weight-EMA of the LoRA (used for EMA eval)
    train.ema_decay = 0.99  # weight-EMA max decay
    train.ema_update_step_interval = 1  # optimizer steps between weight-EMA updates
    train.train_timesteps = 6  # timesteps T per micro-batch
    train.kl_weight = "Uniform"  # "Uniform" | "ELBO" weighting of the base-model KL
    train.loss_type = "exp_first"  # "exp_first" | "sum_first" ratio
    train.weighting = "Uniform"  # Uniform | t | t**2 | huber | ghuber
    train.ghuber_power = 0.25  # p of the ghuber weighting
    train.kl_ema_weight = "Uniform"  # "Uniform" | "ELBO" weighting of the KL-EMA
    train.kl_ema_decay = 0.3  # KL-EMA adapter decay (cap for "linear")
    train.kl_ema_decay_type = "linear"  # "linear" | "constant"
    train.ema_beta = 0.0  # weight of the KL to the KL-EMA adapter
    train.off_policy = False  # sample with the `ema` adapter, old log-probs from it
    train.use_sa_solver = False  # SA-Solver rollout (else SDE)
    train.decay_steps = 1e10  # cosine LR decay length in optimizer steps
    train.gradient_checkpointing = False  # recompute transformer activations in backward (less memory, ~+25% time)
    # Execution switches (speed.py): same mathematics, other speed. "auto" = on for CUDA, off on CPU.
    train.compile = "auto"  # "auto" | "true" | "false": torch.compile each repeated transformer block, once per run
    train.compile_mode = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune[-no-cudagraphs]
    train.compile_backend = "inductor"  # inductor | aot_eager | eager (the last two: wiring checks, no code generation)
    train.fused_adam = "auto"  # "auto" | "true" | "false": torch.optim.AdamW(fused=True), one kernel per step
    train.batched_reference = False  # base-model and KL-EMA forwards as one call of 2x rows (peft mixed-adapter batch)

    # ---- rewards ----
    config.rewards = rewards = ml_collections.ConfigDict()
    rewards.device = ""  # device for reward models ("" = the process's device)
    rewards.batch_size = 16  # images per reward-model forward
    rewards.dtype = "float32"  # reward model dtype: float32 | float16 | bfloat16
    rewards.pickscore_model = "yuvalkirstain/PickScore_v1"  # CLIP-H PickScore weights
    rewards.pickscore_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # processor
    rewards.geneval_detector = "facebook/mask2former-swin-small-coco-instance"  # detector
    rewards.geneval_clip = "openai/clip-vit-large-patch14"  # colour classifier
    rewards.geneval_object_names = ""  # class-name list ("" = detector's id2label)
    rewards.remote_geneval_url = ""  # optional JSON-over-HTTP GenEval scorer
    rewards.remote_geneval_timeout_s = 600.0  # seconds per remote scoring call, retries included
    rewards.remote_geneval_retries = 3  # retries after a connection error, timeout or HTTP 5xx (backoff 1, 2, 4 s)
    rewards.max_failure_fraction = 0.5  # fraction (0-1] of an epoch's reward calls failing that marks a failed epoch
    rewards.max_failed_epochs = 3  # failed epochs in a row before the run saves a checkpoint and stops
    rewards.aesthetic_clip = "openai/clip-vit-large-patch14"  # aesthetic: CLIP ViT-L/14 model + processor
    rewards.aesthetic_head = AESTHETIC_HEAD_URL  # aesthetic: LAION MLP head .pth, local path or URL (cached)
    rewards.imagereward_model = "THUDM/ImageReward"  # ImageReward.pt + med_config.json: hub repo or local dir
    rewards.imagereward_tokenizer = "bert-base-uncased"  # ImageReward's BLIP tokenizer (BERT uncased)
    rewards.qwenvl_model = "Qwen/Qwen2.5-VL-7B-Instruct"  # qwenvl judge (in process)
    rewards.qwenvl_dtype = "bfloat16"  # qwenvl judge dtype: float32 | float16 | bfloat16
    rewards.qwenvl_max_new_tokens = 2048  # qwenvl: tokens the judge may generate per image
    rewards.deqa_url = "http://127.0.0.1:18086"  # deqa: JSON DeQA-Score server
    rewards.unifiedreward_url = "http://127.0.0.1:17140/v1"  # unifiedreward: OpenAI-compatible API base URL
    rewards.unifiedreward_model = "UnifiedReward-7b-v1.5"  # unifiedreward: served model name
    rewards.remote_timeout_s = 600.0  # deqa / unifiedreward: total seconds per request or batch, retries included
    rewards.remote_retries = 3  # deqa / unifiedreward: retries (backoff 1, 2, 4 s ...) on errors, 5xx, 429
    rewards.custom_options = ml_collections.ConfigDict()  # free-form settings for rewards from your own module

    config.lock()
    return config
