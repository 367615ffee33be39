"""Dynamic batches by token count, as the paper's memory-sized batches: sentences sorted by length
(with seeded noise, reshuffled each epoch) are cut into batches of at most `batch_tokens` padded
tokens, the batch order is shuffled, and worker i of N takes batches i, i+N, ... of every epoch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from pyasgd.data.subword import BOS, EOS, PAD


@dataclass
class SentenceBatch:
    """Padded sentence pairs of one training batch (token ids), as the translation model reads them."""
    src: torch.Tensor      # (B, S) source ids, PAD-padded
    tgt_in: torch.Tensor   # (B, T) BOS + target
    tgt_out: torch.Tensor  # (B, T) target + EOS
    tokens: int            # target tokens (with EOS)

    def to(self, device) -> "SentenceBatch":
        return SentenceBatch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.tokens)


def collate(src: list[list[int]], tgt: list[list[int]]) -> SentenceBatch:
    B, S, T = len(src), max(map(len, src)), max(map(len, tgt)) + 1
    s = torch.full((B, S), PAD, dtype=torch.long)
    ti = torch.full((B, T), PAD, dtype=torch.long)
    to = torch.full((B, T), PAD, dtype=torch.long)
    for i, (a, b) in enumerate(zip(src, tgt)):
        s[i, :len(a)] = torch.tensor(a)
        ti[i, :len(b) + 1] = torch.tensor([BOS] + b)
        to[i, :len(b) + 1] = torch.tensor(b + [EOS])
    return SentenceBatch(s, ti, to, sum(len(b) + 1 for b in tgt))


def epoch_batches(src_lens: list[int], tgt_lens: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """All batches (lists of sentence indices) of one epoch, in this epoch's order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = len(src_lens)
    noise = torch.rand(n, generator=g)
    key = [(tgt_lens[i] + noise[i].item(), src_lens[i]) for i in range(n)]  # bucket by length
    order = sorted(range(n), key=lambda i: key[i])
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, src_lens[i], tgt_lens[i] + 1)
        if cur and w * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, w = [], max(src_lens[i], tgt_lens[i] + 1)
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[j] for j in perm]


def worker_batches(src: list[list[int]], tgt: list[list[int]], batch_tokens: int, seed: int, worker: int,
                   workers: int, epoch: int, index: int) -> Iterator[tuple[SentenceBatch, int, int]]:
    """Worker's batches from (epoch, index) on, forever; yields (batch, next epoch, next index)."""
    src_lens, tgt_lens = [len(s) for s in src], [len(t) for t in tgt]
    while True:
        mine = epoch_batches(src_lens, tgt_lens, batch_tokens, seed, epoch)[worker::workers]
        while index < len(mine):
            idx = mine[index]
            index += 1
            nxt = (epoch, index) if index < len(mine) else (epoch + 1, 0)
            yield collate([src[i] for i in idx], [tgt[i] for i in idx]), *nxt
        epoch, index = epoch + 1, 0
