"""Seeds derived from the run's one seed, so every stretch of training can be replayed alone.

Each client's local training in each round starts from `training_seed(seed, round, client)`:
a run resumed at round k trains exactly as the uninterrupted run did, and centralized training
(round 0, client 0) draws the same augmentation and batch order as a single FedAvg client.
"""

from __future__ import annotations

import lightning as L
import torch


def training_seed(seed: int, round_index: int = 0, client: int = 0) -> int:
    """A distinct, reproducible seed per (seed, round, client)."""
    return (seed * 1_000_003 + round_index * 10_007 + client) % (2**31 - 1)


def seed_training(generator: torch.Generator, seed: int, round_index: int = 0, client: int = 0):
    """Seed the global RNGs (augmentation, init) and a data loader's generator (batch order)."""
    value = training_seed(seed, round_index, client)
    L.seed_everything(value, workers=True, verbose=False)
    generator.manual_seed(value)
