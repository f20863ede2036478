"""CPU toy task for RL fine-tuning (issue F.2): coloured-shape images and prompts
(`toy.shapes`), and a small SD3-architecture pipeline pretrained on them
(`toy.pretrain`). The matching reward is `rewards.shapes` ("shapes" in REWARDS)."""
