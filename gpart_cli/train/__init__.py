"""Training (docs/design.md §5.2-5.3): the loop (`trainer`), the run dir and resumable checkpoints, Ctrl-C at a step
boundary, tracking, DDP/FSDP, the GRPO objective and `sweep-d`."""
