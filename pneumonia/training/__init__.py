"""One model's training, the same for centralized and federated runs: the LightningModule
(`module`), losses, optimizers, learning-rate schedules, the recipe a checkpoint carries
(`recipe`), checkpoint files (`checkpoint`) and DP-SGD (`privacy`)."""
