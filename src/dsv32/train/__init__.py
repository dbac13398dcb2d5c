"""Training: the shared loop, pretraining, SFT, GRPO, and scale-out (FSDP2 + expert parallelism)."""
