"""The sections of the config that say what is learned and how: the method, the data, the
synthetic task, the model and the optimiser. Each field's docstring is its --help; each section
checks its own fields in __post_init__ (TrainConfig checks what spans sections)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pyasgd.config.base import (FIXED, MODES, POSITIONS, RNN_CELLS, SCHEDULES, TASKS, check_choice, check_types,
                                need, preset_names)
from pyasgd.config.policy import parse_policy, parse_predict
from pyasgd.errors import ConfigError


@dataclass(kw_only=True)
class MethodConfig:
    """How workers and server exchange gradients: the paper's methods."""
    title: ClassVar[str] = "method"

    mode: str = field(default="sync", metadata={"choices": MODES})
    """sync: the server sums one gradient from each worker per update and workers wait for it
    (the paper's synchronous SGD; the default, which had the best dev BLEU on the default job:
    README); async: no barrier (with --global-accum, --predict and the stale policies)."""
    workers: int = field(default=2, metadata=FIXED)
    """N, the number of worker processes (or virtual workers with --simulate); per node when
    --nnodes > 1 (M x N workers in all)."""
    global_accum: int | None = None
    """G, gradients summed by the server per update, with --mode async. Default: N, the paper's
    recommendation (asynchronous with global accumulation); 1 is plain asynchronous SGD; sync is always N.
    Across nodes N means all M x N workers."""
    local_accum: int = 1
    """k, batches a worker sums before it pushes one gradient."""
    pull_every: int = 1
    """U, a worker pulls parameters only every U server updates (injected staleness)."""
    stale_policy: str = "none"
    """none; scale (weight each gradient by 1/max(1, staleness)); drop:T (discard gradients
    staler than T); dc:L (delay compensation, DC-ASGD: g + L*g*g*(w_now - w_pulled)); dc-adaptive:L
    (L divided per element by the root of Adam's second moment); momentum (lower Adam's beta1 by
    the measured staleness). See docs/compensation.md."""
    predict: str = "0"
    """weight prediction: the server publishes w + S*dw (dw its last update), so gradients are
    computed near where they are applied; auto: S = the expected staleness (N-1)/G; 0 = off. The
    master stays exact: validation, checkpoints and the test use it."""
    ema: float = 0.0
    """exponential smoothing: keep an average of the parameters with this decay (e.g. 0.99), used for
    validation, the best checkpoint and the test; 0 = off."""

    def __post_init__(self) -> None:
        if isinstance(self.predict, (int, float)) and not isinstance(self.predict, bool):
            self.predict = f"{self.predict:g}"  # predict = 0.75 in a TOML file
        check_types(self)
        check_choice(self, "mode")
        need(self.workers >= 1, "workers", f"need at least 1 worker, got {self.workers}")
        need(self.global_accum is None or self.global_accum >= 1, "global_accum",
             f"must be >= 1, got {self.global_accum}")
        need(self.local_accum >= 1, "local_accum", f"must be >= 1, got {self.local_accum}")
        need(self.pull_every >= 1, "pull_every", f"must be >= 1, got {self.pull_every}")
        for check in (lambda: parse_policy(self.stale_policy), lambda: parse_predict(self.predict)):
            try:
                check()
            except ValueError as e:
                raise ConfigError(str(e)) from None
        need(0 <= self.ema < 1, "ema", f"must be in [0, 1) (0 turns smoothing off), got {self.ema}")

    def stale_drop(self) -> int | None:
        """T of drop:T, else None."""
        kind, arg = parse_policy(self.stale_policy)
        return arg if kind == "drop" else None


@dataclass(kw_only=True)
class DataConfig:
    """What to train on: the task, its corpus and subwords, the batches, the seed."""
    title: ClassVar[str] = "task and data"

    task: str = field(default="translation", metadata={**FIXED, "choices": TASKS})
    """what to train: translation (the bundled corpus or --train-src/...) or synthetic (a small
    sequence task for tests and quick runs)."""
    seed: int = field(default=1, metadata=FIXED)
    """seed of model initialisation, data order and worker randomness."""
    train_src: str = field(default="", metadata=FIXED)
    """training source text (UTF-8, one sentence per line); default: the bundled English-German Bible."""
    train_tgt: str = field(default="", metadata=FIXED)
    """training target text, line-parallel to --train-src (default: the bundled corpus's)."""
    dev_src: str = ""
    """dev source text (validation BLEU); needed with --train-src (default: the bundled corpus's)."""
    dev_tgt: str = ""
    """dev target text (references); needed with --train-src (default: the bundled corpus's)."""
    test_src: str = ""
    """test source text (BLEU at the end); optional with --train-src (default: the bundled
    corpus's, none with --train-src)."""
    test_tgt: str = ""
    """test target text (references), with --test-src (default: the bundled corpus's, none with
    --train-src)."""
    vocab_size: int = field(default=2000, metadata=FIXED)
    """joint sentencepiece vocabulary size."""
    max_len: int = field(default=40, metadata=FIXED)
    """training pairs with a side longer than this many subwords are skipped."""
    batch_tokens: int = field(default=2500, metadata=FIXED)
    """tokens per batch (padded source or target, whichever is longer): memory-sized batches."""

    def __post_init__(self) -> None:
        check_types(self)
        check_choice(self, "task")
        need(self.vocab_size >= 8, "vocab_size", f"must be >= 8, got {self.vocab_size}")
        need(self.max_len >= 1, "max_len", f"must be >= 1, got {self.max_len}")
        need(self.batch_tokens >= self.max_len + 1, "batch_tokens",
             f"must hold at least one sentence (>= --max-len + 1 = {self.max_len + 1}), got {self.batch_tokens}")


@dataclass(kw_only=True)
class SyntheticConfig:
    """The synthetic task's sequences (--task synthetic)."""
    title: ClassVar[str] = "synthetic task"

    batch_size: int = field(default=32, metadata=FIXED)
    """sequences per batch (synthetic task)."""
    seq_len: int = field(default=16, metadata=FIXED)
    """sequence length (synthetic task)."""
    vocab: int = field(default=16, metadata=FIXED)
    """vocabulary size (synthetic task)."""
    train_size: int = field(default=4096, metadata=FIXED)
    """training sequences per epoch (synthetic task)."""
    compute_delay: float = 0.0
    """mean seconds each synthetic batch also sleeps (uniform 0.5-1.5 times this), emulating
    accelerator-bound workers: N workers then truly overlap even on a machine with fewer cores
    than workers (the real-process staleness tests)."""

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("batch_size", "seq_len", "train_size"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        need(self.vocab >= 2, "vocab", f"must be >= 2, got {self.vocab}")
        need(self.compute_delay >= 0, "compute_delay", "must be >= 0 (0 = no delay)")


@dataclass(kw_only=True)
class ModelConfig:
    """The model (a preset and what may change in it) and its decoding."""
    title: ClassVar[str] = "model and decoding"

    preset: str = field(default="tiny", metadata={**FIXED, "choices": preset_names})
    """model preset: tiny (CPU), base (the paper's 6+6 Transformer, GPUs), rnn-tiny, rnn-base."""
    dropout: float | None = None
    """dropout (default: the preset's)."""
    rnn_cell: str = field(default="gru", metadata={**FIXED, "choices": RNN_CELLS})
    """gru or lstm, for the rnn presets."""
    positions: str = field(default="", metadata={**FIXED, "choices": POSITIONS})
    """transformer positions: sinusoidal or learned (default: the preset's)."""
    prenorm: bool | None = field(default=None, metadata=FIXED)
    """transformer layer norm before (pre-norm) or after (post-norm) each sublayer (default: the preset's)."""
    label_smoothing: float = 0.1
    """label smoothing of the training loss."""
    beam: int = 1
    """beam size for validation and test decoding (1 = greedy)."""
    length_penalty: float = 0.6
    """GNMT length penalty exponent for beam search."""

    def __post_init__(self) -> None:
        check_types(self)
        check_choice(self, "preset")
        need(self.dropout is None or 0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check_choice(self, "rnn_cell")
        check_choice(self, "positions", " (or empty for the preset's)")
        need(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        need(self.beam >= 1, "beam", f"must be >= 1, got {self.beam}")


@dataclass(kw_only=True)
class OptimConfig:
    """Adam on the server: learning rate, schedule, moments, decay, clipping."""
    title: ClassVar[str] = "optimiser"

    lr: float = 3e-3
    """peak learning rate. The loss is a sum over tokens, so a summed update of G gradients
    weights every token equally; Adam is invariant to the gradient's scale, so lr need not
    change with G or batch size (the step size is lr whatever their product)."""
    schedule: str = field(default="inverse-sqrt", metadata={"choices": SCHEDULES})
    """inverse-sqrt (linear warm-up, then lr * sqrt(warmup / update)) or constant."""
    warmup: int = 300
    """warm-up length in server updates."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.98
    """Adam beta2."""
    eps: float = 1e-9
    """Adam epsilon."""
    weight_decay: float = 0.0
    """L2 weight decay (decoupled as AdamW with --decoupled)."""
    decoupled: bool = False
    """use decoupled weight decay (AdamW)."""
    clip_norm: float = 0.0
    """clip the server's summed gradient to this global norm; 0 = no clipping."""

    def __post_init__(self) -> None:
        check_types(self)
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check_choice(self, "schedule")
        need(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        need(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        need(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        need(self.eps >= 0, "eps", f"must be >= 0, got {self.eps}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.clip_norm >= 0, "clip_norm", f"must be >= 0 (0 turns clipping off), got {self.clip_norm}")
