"""Learning-rate schedules, counted in server updates (the paper's: linear warm-up, then inverse
square root decay)."""
from __future__ import annotations

import math


def learning_rate(update: int, *, lr: float, schedule: str, warmup: int) -> float:
    """The learning rate of server update `update` (1-based)."""
    if schedule == "constant":
        return lr
    if warmup > 0 and update <= warmup:
        return lr * update / warmup
    return lr * math.sqrt(max(warmup, 1) / update)
