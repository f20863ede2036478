"""The toy benchmark presets: valid, and identical in every size they share
(the AWM vs Flow-GRPO comparison scales both down the same way)."""

from advantage_weighted_matching.config import toy_awm, validate

SHARED = ("resolution", "max_sequence_length", "num_epochs", "sample.num_steps", "sample.train_batch_size",
          "sample.num_image_per_prompt", "sample.num_batches_per_epoch", "sample.global_std", "train.batch_size",
          "train.gradient_accumulation_steps", "train.train_timesteps", "train.timestep_fraction",
          "train.learning_rate", "train.lora_rank", "train.lora_alpha", "pretrained.model", "dataset", "seed")


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_toy_presets_validate_and_share_sizes():
    awm, flow_grpo = toy_awm.toy_awm(), toy_awm.toy_flow_grpo()
    for config in (awm, flow_grpo):
        plan = validate(config, 1)
        assert plan["images_per_epoch"] == 32 and plan["optimizer_steps_per_epoch"] == 1
        assert dict(config.reward_fn) == {"shapes": 1.0}
    for key in SHARED:
        assert _get(awm, key) == _get(flow_grpo, key), key
    assert (awm.train.algorithm, flow_grpo.train.algorithm) == ("awm", "flow_grpo")
    assert awm.train.use_sa_solver and not flow_grpo.train.use_sa_solver
    assert (awm.train.clip_range, flow_grpo.train.clip_range) == (1.0, 1e-4)
    assert toy_awm.describe("flow_grpo")["sample.noise_level"] == 0.7
