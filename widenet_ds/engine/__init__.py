"""DeepSpeed underneath the jobs: config checks, the engine and optimizer, torch.compile, checkpoints."""
