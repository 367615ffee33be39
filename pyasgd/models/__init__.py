"""Translation models: the Transformer and the attentional RNN the paper trains, built from named
presets or explicit sizes. Both expose encode(src) and decode_step(prefix, memory) for search."""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = "transformer"   # transformer | rnn
    dim: int = 128              # model width (transformer) / embedding size (rnn)
    heads: int = 4
    ffn: int = 512
    enc_layers: int = 2
    dec_layers: int = 2
    dropout: float = 0.1
    prenorm: bool = True        # transformer: pre-norm (False: the original post-norm)
    positions: str = "sinusoidal"  # sinusoidal | learned
    max_positions: int = 256
    rnn_cell: str = "gru"       # gru | lstm
    hidden: int = 256           # rnn hidden size


PRESETS = {
    # CPU and tests: ~1.2M parameters with a 2k vocabulary
    "tiny": ModelConfig(arch="transformer", dim=128, heads=4, ffn=512, enc_layers=2, dec_layers=2, dropout=0.1),
    # the paper's Transformer base: 6 + 6 layers (GPUs)
    "base": ModelConfig(arch="transformer", dim=512, heads=8, ffn=2048, enc_layers=6, dec_layers=6, dropout=0.1,
                        prenorm=False),
    "rnn-tiny": ModelConfig(arch="rnn", dim=128, hidden=256, enc_layers=1, dec_layers=1, dropout=0.1),
    "rnn-base": ModelConfig(arch="rnn", dim=512, hidden=1024, enc_layers=1, dec_layers=1, dropout=0.2),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def model_config_from(config) -> ModelConfig:
    """The model a TrainConfig asks for: its preset with the options it overrides."""
    c = config
    return model_config(c.preset, dropout=c.dropout, rnn_cell=c.rnn_cell, positions=c.positions or None,
                        prenorm=c.prenorm)


def build(cfg: ModelConfig, vocab: int) -> nn.Module:
    if cfg.arch == "transformer":
        from pyasgd.models.transformer import Transformer

        return Transformer(cfg, vocab)
    if cfg.arch == "rnn":
        from pyasgd.models.rnn import RNNSeq2Seq

        return RNNSeq2Seq(cfg, vocab)
    raise ValueError(f"unknown architecture {cfg.arch!r}; choose transformer or rnn")
