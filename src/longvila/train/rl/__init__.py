"""Stage 6: reinforcement learning with verifiable rewards (GRPO with DAPO options) on long videos.

- `grpo`: advantages, rollout packing, token log-probabilities and the loss (exact under MM-SP);
- `rewards`: exact-answer, multiple-choice-letter and format rewards;
- `rollout`: the rollout-engine interface and the built-in engine on `LongVILA.generate`;
- `cache`: frame embeddings computed once per video (content-hashed, persistent);
- `trainer`: `RLTrainer`, the loop on the SFT stages' trainer (docs/rl.md).
"""
