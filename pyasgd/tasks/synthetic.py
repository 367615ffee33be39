"""A small synthetic sequence task for tests and quick runs: predict y_t = (x_t + x_{t-1}) mod V
for random token sequences x. Learnable in a few hundred updates by a ~4K-parameter model, so
every method of the paper can be exercised in seconds on a CPU."""
from __future__ import annotations

import os
import random
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pyasgd.tasks.base import Cursor, Task


class PairSumModel(nn.Module):
    """Embeds the current and the previous token and predicts their sum mod V."""

    def __init__(self, vocab: int, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T) -> logits (B, T, V)
        e = self.embed(x)
        prev = F.pad(e, (0, 0, 1, 0))[:, :-1]  # embedding of x_{t-1}, zeros at t = 0
        return self.mlp(torch.cat([e, prev], dim=-1))


def _targets(x: torch.Tensor, vocab: int) -> torch.Tensor:
    prev = F.pad(x, (1, 0))[:, :-1]
    return (x + prev) % vocab


class SyntheticTask(Task):
    primary = "accuracy"
    higher_is_better = True

    def __init__(self, config) -> None:
        super().__init__(config)
        # (train_size, seq_len) and (512, seq_len) token ids, from the run's seed
        g = torch.Generator().manual_seed(config.seed * 7919 + 1)
        self.train_x = torch.randint(0, config.vocab, (config.train_size, config.seq_len), generator=g)
        self.valid_x = torch.randint(0, config.vocab, (512, config.seq_len), generator=g)
        self._jitter = random.Random(os.getpid())

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.config.seed)
        return PairSumModel(self.config.vocab)

    def shard(self, worker: int, workers: int, epoch: int) -> torch.Tensor:
        """Indices of worker's share of `epoch`: a seeded permutation, dealt round-robin."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(self.config.train_size, generator=g)[worker::workers]

    def batches(self, worker: int, workers: int, cursor: Cursor) -> Iterator[tuple[torch.Tensor, Cursor]]:
        B = self.config.batch_size
        epoch, index = cursor.epoch, cursor.index
        while True:
            idx = self.shard(worker, workers, epoch)
            per_epoch = len(idx) // B
            while index < per_epoch:
                batch = self.train_x[idx[index * B:(index + 1) * B]]
                index += 1
                nxt = Cursor(epoch, index) if index < per_epoch else Cursor(epoch + 1, 0)
                yield batch, nxt
            epoch, index = epoch + 1, 0

    def shard_batches(self, worker: int, workers: int, epoch: int) -> int:
        return len(range(worker, self.config.train_size, workers)) // self.config.batch_size

    def epoch_tokens(self) -> int:
        return self.config.train_size * self.config.seq_len

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.config.compute_delay:
            # an accelerator busy with the batch, for a varying time: real step times vary, and
            # equal ones would keep the workers in lockstep (async with G = N would act as sync)
            time.sleep(self.config.compute_delay * self._jitter.uniform(0.5, 1.5))
        logits = model(batch)
        y = _targets(batch, self.config.vocab)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"), y.numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        x = self.valid_x.to(device)
        logits = model(x)
        y = _targets(x, self.config.vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        acc = (logits.argmax(-1) == y).float().mean().item()
        return {"accuracy": acc, "loss": loss}
