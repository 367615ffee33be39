"""Batched greedy and beam search over a model's start(src) / decode_step(token, state, t) /
reorder(state, index) (incremental: each step computes one new position). Beam search with
beam 1 takes the same argmax path as greedy search.

Both keep an untrained or barely trained model's output short: BOS and PAD are never generated
(an untrained model's favourite token is often BOS, which decodes to nothing), and a hypothesis
that has fallen into a loop (one token 4 times in a row, or a 2- or 3-token group 3 times) ends
there, as if it had produced EOS. Without this, garbage runs to the length limit and decoding an
untrained model's dev and test sets takes minutes; a trained model's output is not affected
unless it loops.
"""
from __future__ import annotations

import torch

from pyasgd.data.subword import BOS, EOS, PAD

LOOPS = ((1, 4), (2, 3), (3, 3))  # (group size, repeats) that end a hypothesis


def looping(prefix: torch.Tensor) -> torch.Tensor:
    """Rows of `prefix` (B, 1 + t: BOS, then the tokens so far) whose last tokens are one group
    repeated as LOOPS says."""
    out = torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
    for n, reps in LOOPS:
        if prefix.shape[1] - 1 < n * reps:
            continue
        tail = prefix[:, -n * reps:].reshape(prefix.shape[0], reps, n)
        out |= (tail == tail[:, :1]).all(2).all(1)
    return out


def constrain(logp: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """logp (rows, V) of the next token, in place: never BOS or PAD; only EOS after a loop."""
    logp[:, BOS] = float("-inf")
    logp[:, PAD] = float("-inf")
    loop = looping(prefix)
    if bool(loop.any()):
        logp[loop] = float("-inf")
        logp[loop, EOS] = 0.0
    return logp


@torch.no_grad()
def greedy(model, src: torch.Tensor, max_len: int) -> list[list[int]]:
    state = model.start(src)
    B = src.shape[0]
    prefix = torch.full((B, 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for t in range(max_len):
        logp, state = model.decode_step(prefix[:, -1:], state, t)
        nxt = constrain(logp, prefix).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        prefix = torch.cat([prefix, nxt[:, None]], 1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    return [_strip(row) for row in prefix[:, 1:].tolist()]


def _strip(ids: list[int]) -> list[int]:
    out = []
    for i in ids:
        if i in (EOS, PAD):
            break
        out.append(i)
    return out


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha  # Wu et al. 2016 (GNMT)


@torch.no_grad()
def beam_search(model, src: torch.Tensor, beam: int, max_len: int, alpha: float = 0.6) -> list[list[int]]:
    B, dev = src.shape[0], src.device
    state = model.reorder(model.start(src), torch.arange(B, device=dev).repeat_interleave(beam))
    prefix = torch.full((B * beam, 1), BOS, dtype=torch.long, device=dev)
    scores = torch.zeros(B, beam, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start as one hypothesis
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    for t in range(max_len):
        logp, state = model.decode_step(prefix[:, -1:], state, t)
        logp = constrain(logp, prefix).view(B, beam, -1)                           # (B, beam, V)
        V = logp.shape[-1]
        cand = (scores.unsqueeze(-1) + logp).view(B, -1)
        top, idx = cand.topk(2 * beam, dim=-1)                                    # room for EOS
        new_scores = torch.full((B, beam), float("-inf"), device=dev)
        new_src = torch.zeros(B, beam, dtype=torch.long, device=dev)
        new_tok = torch.full((B, beam), PAD, dtype=torch.long, device=dev)
        top_l, idx_l = top.tolist(), idx.tolist()
        for b in range(B):
            if not alive[b]:
                continue
            k = 0
            for s, j in zip(top_l[b], idx_l[b]):
                if s == float("-inf"):
                    break
                origin, tok = divmod(j, V)
                if tok == EOS or t == max_len - 1:
                    hyp = prefix[b * beam + origin, 1:].tolist() + ([] if tok == EOS else [tok])
                    finished[b].append((s / length_penalty(len(hyp) + 1, alpha), hyp))
                else:
                    new_scores[b, k], new_src[b, k], new_tok[b, k] = s, origin, tok
                    k += 1
                if k == beam:
                    break
            # stop when the best finished beats every live hypothesis at its best possible length
            if len(finished[b]) >= beam or (finished[b] and k == 0):
                alive[b] = False
            elif finished[b]:
                best_live = new_scores[b, 0].item() / length_penalty(max_len, alpha)
                if max(f[0] for f in finished[b]) >= best_live:
                    alive[b] = False
        if not bool(alive.any()):
            break
        order = (torch.arange(B, device=dev)[:, None] * beam + new_src).view(-1)
        prefix = torch.cat([prefix.index_select(0, order), new_tok.view(-1, 1)], 1)
        state = model.reorder(state, order)
        scores = torch.where(alive[:, None], new_scores, torch.full_like(new_scores, float("-inf")))
    out = []
    for b in range(B):
        if finished[b]:
            out.append(max(finished[b], key=lambda f: f[0])[1])
        else:
            out.append([])
    return out
