"""CPU toy tasks for RL fine-tuning: coloured-shape images and prompts, "shapes" (issue F.2:
1-3 shapes of one colour) and "scenes" (issue H: counts 1-4, two colours, spatial relations),
and a small SD3-architecture pipeline pretrained on them (`toy.pretrain`). The matching
rewards are `rewards.shapes` / `rewards.scenes` ("shapes" / "scenes" in REWARDS)."""
