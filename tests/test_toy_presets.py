"""The toy benchmark presets: valid, on the "scenes" task at the issue's scale, and identical in
every size they share (the AWM vs Flow-GRPO comparison scales both down the same way)."""

from advantage_weighted_matching.config import toy_awm, validate
from advantage_weighted_matching.prompts import load_prompts

SHARED = ("resolution", "max_sequence_length", "num_epochs", "eval_freq", "sample.num_steps",
          "sample.eval_num_steps", "sample.train_batch_size", "sample.num_image_per_prompt",
          "sample.num_batches_per_epoch", "sample.test_batch_size", "sample.num_eval_images", "sample.global_std",
          "train.batch_size", "train.learning_rate", "train.lora_rank", "train.lora_alpha", "pretrained.model",
          "pretrained.toy_recipe", "dataset", "reward_fn", "seed")


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_toy_presets_validate_and_share_sizes():
    awm, flow_grpo = toy_awm.toy_awm(), toy_awm.toy_flow_grpo()
    for config in (awm, flow_grpo):
        plan = validate(config, 1)
        assert plan["images_per_epoch"] >= 128 and config.sample.num_image_per_prompt >= 16
        assert dict(config.reward_fn) == {"scenes": 1.0}
        test, _ = load_prompts(config.dataset, config.prompt_fn, "test")
        assert config.sample.num_eval_images == len(test) >= 64
    for key in SHARED:
        assert _get(awm, key) == _get(flow_grpo, key), key
    assert (awm.train.algorithm, flow_grpo.train.algorithm) == ("awm", "flow_grpo")
    assert awm.train.use_sa_solver and not flow_grpo.train.use_sa_solver
    assert toy_awm.describe("flow_grpo")["sample.noise_level"] == 0.7
    assert toy_awm.describe("awm")["train.time_type"] == "discrete_wo_init"
