"""The Task interface: everything the trainer needs to know about what it trains. The trainer
knows nothing about translation; a task builds the model, yields each worker's batches, computes
a batch's summed loss and evaluates a model."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from pyasgd.config import TrainConfig


@dataclass
class Cursor:
    """Where a worker is in its data: the epoch and the next batch within its shard."""
    epoch: int = 0
    index: int = 0

    def pack(self) -> int:
        """One int64 (epoch << 32 | index): written and read as one value across processes, and
        carried with the gradient it follows through the ring."""
        return (self.epoch << 32) | self.index

    @classmethod
    def unpack(cls, value: int) -> "Cursor":
        return cls(int(value) >> 32, int(value) & 0xFFFFFFFF)


class Task:
    """Base class. Subclasses set `primary` (the metric early stopping and best-checkpointing
    use), `higher_is_better`, and implement the four methods. A task owns its metrics: it
    evaluates, tests, and names its own fields in summary.json."""

    primary: str = "loss"
    higher_is_better: bool = False

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def build_model(self) -> torch.nn.Module:
        """The model, initialised from config.seed (identical in every process)."""
        raise NotImplementedError

    def batches(self, worker: int, workers: int, cursor: Cursor) -> Iterator[tuple[Any, Cursor]]:
        """Worker `worker` of `workers`' batches from `cursor` on, forever, each with the cursor
        of the batch after it. Each worker reads its own share of every epoch."""
        raise NotImplementedError

    def shard_batches(self, worker: int, workers: int, epoch: int) -> int:
        """How many batches worker `worker` of `workers` reads in `epoch` (its share): what a
        fractional --max-epochs counts in."""
        raise NotImplementedError

    def passes_done(self, worker: int, workers: int, cursor: Cursor, limit: float) -> bool:
        """Whether a worker at `cursor` has made `limit` passes over its shard (--max-epochs).
        A whole number compares the epoch alone (a pass ends with the shard's last batch); a
        fraction also counts batches into the last epoch: 2.5 stops halfway through the third."""
        if cursor.epoch >= limit:
            return True
        whole = math.floor(limit)
        if cursor.epoch < whole:
            return False
        return cursor.index >= (limit - whole) * self.shard_batches(worker, workers, cursor.epoch)

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """(loss summed over target tokens, number of target tokens)."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics; must include `primary`."""
        raise NotImplementedError

    def final_test(self, model: torch.nn.Module, run_dir: str) -> dict[str, Any]:
        """Summary fields measured on the test set at the end of training (empty when the task
        has none); the task may also write files of its own into `run_dir`."""
        return {}

    def summary_fields(self, best: float | None, time_to_target: dict[str, Any]) -> dict[str, Any]:
        """Fields the task adds to summary.json under its own names, from the best validation
        score of `primary` and the first (time, update) reaching each --bleu-targets score."""
        return {}

    def batch_tokens(self, batch: Any) -> int:
        """Target tokens in a batch (what loss() counts), without computing anything: the
        simulator's clock charges a batch by them."""
        tokens = getattr(batch, "tokens", None)
        return int(tokens) if tokens is not None else int(batch.numel())

    def epoch_tokens(self) -> int | None:
        """Target tokens in one pass over the training data (for the fractional epoch of the
        records); None where a task cannot say."""
        return None

    def describe(self) -> str:
        """One line on the data, printed when a run starts."""
        return ""

    def artifacts(self) -> dict[str, str]:
        """Files a run directory should keep a copy of (name -> path), e.g. the subword model."""
        return {}

    def batch_to(self, batch: Any, device: torch.device) -> Any:
        """The batch on `device` (tensors and the translation task's batches have .to())."""
        return batch.to(device)
