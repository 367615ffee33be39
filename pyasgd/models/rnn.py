"""RNN encoder-decoder with attention (Bahdanau et al. 2015, Luong-style scoring), GRU or LSTM: the
paper's second model family. Bidirectional encoder, one-layer decoder fed its previous output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyasgd.data.subword import PAD


class RNNSeq2Seq(nn.Module):
    def __init__(self, cfg, vocab: int) -> None:
        super().__init__()
        cell = {"gru": nn.GRU, "lstm": nn.LSTM}[cfg.rnn_cell]
        self.lstm = cfg.rnn_cell == "lstm"
        E, H = cfg.dim, cfg.hidden
        self.embed = nn.Embedding(vocab, E, padding_idx=PAD)
        self.encoder = cell(E, H // 2, num_layers=cfg.enc_layers, batch_first=True, bidirectional=True)
        self.decoder = cell(E + H, H, num_layers=cfg.dec_layers, batch_first=True)
        self.attn = nn.Linear(H, H, bias=False)
        self.combine = nn.Linear(2 * H, E)
        self.drop = nn.Dropout(cfg.dropout)
        self.hidden = H

    def encode(self, src):
        mask = src != PAD
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.drop(self.embed(src)), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.encoder(packed)
        memory, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        return memory, mask, None  # (B, S, H), (B, S), decoder state (None: zeros)

    def _run(self, tgt_in, memory, mask, state, feed):
        """Teacher-forced (or step-wise) decoding with input feeding; returns logits and state."""
        outs = []
        for t in range(tgt_in.shape[1]):
            x = torch.cat([self.drop(self.embed(tgt_in[:, t:t + 1])), feed.unsqueeze(1)], -1)
            h, state = self.decoder(x, state)                                      # (B, 1, H)
            score = torch.bmm(self.attn(h), memory.transpose(1, 2)).masked_fill(~mask[:, None], -1e9)
            ctx = torch.bmm(F.softmax(score, -1), memory).squeeze(1)               # (B, H)
            feed = ctx
            outs.append(torch.tanh(self.combine(torch.cat([h.squeeze(1), ctx], -1))))
        logits = self.drop(torch.stack(outs, 1)) @ self.embed.weight.t()           # tied output
        return logits, state, feed

    def forward(self, src, tgt_in):
        memory, mask, _ = self.encode(src)
        feed = memory.new_zeros(src.shape[0], self.hidden)
        return self._run(tgt_in, memory, mask, None, feed)[0]

    # --- incremental decoding: state = (memory, mask, decoder state, input feed)
    def start(self, src):
        memory, mask, _ = self.encode(src)
        return memory, mask, None, memory.new_zeros(src.shape[0], self.hidden)

    def decode_step(self, token, state, t):
        memory, mask, h, feed = state
        logits, h, feed = self._run(token, memory, mask, h, feed)
        return F.log_softmax(logits[:, -1], dim=-1), (memory, mask, h, feed)

    @staticmethod
    def reorder(state, index):
        memory, mask, h, feed = state
        if h is not None:
            h = tuple(x.index_select(1, index) for x in h) if isinstance(h, tuple) else h.index_select(1, index)
        return memory.index_select(0, index), mask.index_select(0, index), h, feed.index_select(0, index)
