"""Transformer encoder-decoder (Vaswani et al. 2017): post-norm as published or pre-norm,
sinusoidal or learned positions, one embedding shared by source, target and output (a joint
subword vocabulary)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pyasgd.data.subword import PAD


def sinusoids(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)
    return pe


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def keys_values(self, mem):  # (B, S, C) -> k, v (B, h, S, c)
        B, S, C = mem.shape
        k, v = self.kv(mem).view(B, S, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x, k, v, mask=None, causal=False):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)     # (B, h, T, c)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x, mem, mask=None, causal=False):  # x (B, T, C), mem (B, S, C)
        return self.attend(x, *self.keys_values(mem), mask, causal)


class Block(nn.Module):
    def __init__(self, dim, heads, ffn, dropout, prenorm, cross):
        super().__init__()
        self.prenorm = prenorm
        self.self_attn = Attention(dim, heads, dropout)
        self.cross = Attention(dim, heads, dropout) if cross else None
        self.ff = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3 if cross else 2))
        self.drop = nn.Dropout(dropout)

    def _sub(self, i, x, fn):
        if self.prenorm:
            return x + self.drop(fn(self.norms[i](x)))
        return self.norms[i](x + self.drop(fn(x)))

    def forward(self, x, self_mask=None, causal=False, mem=None, mem_mask=None):
        x = self._sub(0, x, lambda y: self.self_attn(y, y, self_mask, causal))
        if self.cross is not None:
            x = self._sub(1, x, lambda y: self.cross(y, mem, mem_mask))
        return self._sub(len(self.norms) - 1, x, self.ff)


class Transformer(nn.Module):
    def __init__(self, cfg, vocab: int) -> None:
        super().__init__()
        d = cfg.dim
        self.dim = d
        self.embed = nn.Embedding(vocab, d, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.max_positions, d)
        else:
            self.register_buffer("pe", sinusoids(cfg.max_positions, d), persistent=False)
            self.pos = None
        self.encoder = nn.ModuleList(Block(d, cfg.heads, cfg.ffn, cfg.dropout, cfg.prenorm, False) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(Block(d, cfg.heads, cfg.ffn, cfg.dropout, cfg.prenorm, True) for _ in range(cfg.dec_layers))
        self.enc_norm = nn.LayerNorm(d) if cfg.prenorm else nn.Identity()
        self.dec_norm = nn.LayerNorm(d) if cfg.prenorm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)

    def _embed(self, ids):
        T = ids.shape[1]
        pos = self.pos.weight[:T] if self.pos is not None else self.pe[:T]
        return self.drop(self.embed(ids) * math.sqrt(self.dim) + pos)

    def encode(self, src):  # src (B, S) -> (memory (B, S, C), key mask (B, 1, 1, S))
        mask = (src != PAD)[:, None, None, :]
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, self_mask=mask)
        return self.enc_norm(x), mask

    def decode(self, tgt_in, memory, mem_mask):  # -> logits (B, T, V), tied output projection
        x = self._embed(tgt_in)
        for layer in self.decoder:
            x = layer(x, causal=True, mem=memory, mem_mask=mem_mask)
        return self.dec_norm(x) @ self.embed.weight.t()

    def forward(self, src, tgt_in):
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    # --- incremental decoding: state = (mem_mask, [(self_k, self_v, cross_k, cross_v)] per layer)
    def start(self, src):
        memory, mask = self.encode(src)
        B, C = src.shape[0], self.dim
        layers = []
        for layer in self.decoder:
            empty = memory.new_zeros(B, layer.self_attn.heads, 0, C // layer.self_attn.heads)
            layers.append((empty, empty, *layer.cross.keys_values(memory)))
        return mask, layers

    def decode_step(self, token, state, t):
        """Log-probabilities of the token after position t, given the token at t (B, 1); equal to
        decode() on the whole prefix, computing only the new position."""
        mask, layers = state
        pos = self.pos.weight[t:t + 1] if self.pos is not None else self.pe[t:t + 1]
        x = self.embed(token) * math.sqrt(self.dim) + pos
        new = []
        for layer, (sk, sv, ck, cv) in zip(self.decoder, layers):
            def self_attn(y):
                nonlocal sk, sv
                k, v = layer.self_attn.keys_values(y)
                sk, sv = torch.cat([sk, k], 2), torch.cat([sv, v], 2)
                return layer.self_attn.attend(y, sk, sv)  # the new position sees every earlier one
            x = layer._sub(0, x, self_attn)
            x = layer._sub(1, x, lambda y: layer.cross.attend(y, ck, cv, mask))
            x = layer._sub(2, x, layer.ff)
            new.append((sk, sv, ck, cv))
        logits = self.dec_norm(x)[:, -1] @ self.embed.weight.t()
        return F.log_softmax(logits, dim=-1), (mask, new)

    @staticmethod
    def reorder(state, index):
        mask, layers = state
        return mask.index_select(0, index), [tuple(x.index_select(0, index) for x in layer) for layer in layers]
