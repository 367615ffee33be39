"""TrainConfig: the single source of truth for a training run. The CLI is generated from it
(each field's docstring is its --help), `--config FILE` loads TOML onto it, and config.json
round-trips it."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

from pyasgd.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODES = ("sync", "async")
SCHEDULES = ("inverse-sqrt", "constant")
SIM_ORDERS = ("round-robin", "normal")
PATIENCE_METRICS = ("", "loss", "bleu")
AMP = ("none", "bf16")
GRAD_DTYPES = ("fp32", "bf16")
# Marks a setting that shapes the model or the data: a resumed run must keep it (see rundir.py).
FIXED = {"resume": "fixed"}
# Settings each node of a multi-node run chooses for itself; every other setting must be the same
# on every node, and the nodes check it at rendezvous (pyasgd/nodes/rendezvous.py).
PER_NODE = ("node_rank", "out", "resume", "quiet", "devices", "server_device", "threads", "worker_slowdown",
            "valid_process", "master_addr")


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(kw_only=True)
class TrainConfig:
    # --- the paper's methods -----------------------------------------------------------------
    mode: str = "async"
    """sync: the server sums one gradient from each worker per update and workers wait for it
    (the paper's synchronous SGD); async: no barrier."""
    workers: int = field(default=2, metadata=FIXED)
    """N, the number of worker processes (or virtual workers with --simulate); per node when
    --nnodes > 1 (M x N workers in all)."""
    global_accum: int | None = None
    """G, gradients summed by the server per update. Default: N, the paper's recommendation
    (asynchronous with global accumulation); 1 is plain asynchronous SGD; sync is always N.
    Across nodes N means all M x N workers."""
    local_accum: int = 1
    """k, batches a worker sums before it pushes one gradient."""
    pull_every: int = 1
    """U, a worker pulls parameters only every U server updates (injected staleness)."""
    stale_policy: str = "none"
    """none; scale (weight each gradient by 1/max(1, staleness)); drop:T (discard gradients
    staler than T)."""

    # --- task and devices ----------------------------------------------------------------------
    task: str = field(default="translation", metadata=FIXED)
    """what to train: translation (the bundled corpus or --train-src/...) or synthetic (a small
    sequence task for tests and quick runs)."""
    devices: str = "cpu"
    """worker devices: cpu, or a comma list such as cuda:0,cuda:1 (assigned round-robin)."""
    server_device: str = "cpu"
    """where the server runs the fused update: cpu (no master copy: it reads the published
    parameters and writes the new ones into the shared region's back buffer) or cuda:I (master
    parameters on that GPU, copied into the back buffer)."""
    amp: str = "none"
    """mixed precision in the workers: none (fp32) or bf16 (forward and backward under bf16
    autocast, on CUDA and on CPUs that support it); gradients reach the server as --grad-dtype
    says and the parameters stay fp32."""
    grad_dtype: str = "bf16"
    """the gradients' type on their way to the server: bf16 (each pusher rounds its gradient to
    nearest even as it copies it into its slot; the server widens the values exactly and sums them
    in fp32): half the bytes per push and per gradient the server reads, at the cost of rounding
    every gradient to 8 significant bits (the default job's dev BLEU: 7.91 against 7.99 with fp32,
    two runs each; benchmarks/RESULTS.md); or fp32. The simulator rounds the same way."""
    worker_slowdown: str = ""
    """RANK:FACTOR[,RANK:FACTOR...]: worker RANK sleeps (FACTOR - 1) times its compute time after
    each gradient, standing for a FACTOR-times slower accelerator (real processes; the simulator
    has --sim-speeds). E.g. 3:2 makes worker 3 a 2x straggler."""
    threads: int = 0
    """torch threads per CPU worker; 0 = floor(cores / workers), at least 1."""
    nnodes: int = field(default=1, metadata=FIXED)
    """M, the number of nodes (machines), each running one pyasgd-train with its own --workers
    workers and shared region; torch.distributed (gloo) carries what crosses nodes. torchrun's
    WORLD_SIZE when started by torchrun --nproc-per-node 1."""
    node_rank: int = 0
    """R, this node's rank in 0..M-1; node 0 hosts the rendezvous and writes the global summary
    (torchrun's RANK)."""
    master_addr: str = "127.0.0.1"
    """the address of node 0, where the nodes meet (torchrun's MASTER_ADDR)."""
    master_port: int = 0
    """the TCP port node 0 listens on for the rendezvous; needed when --nnodes > 1 (torchrun's
    MASTER_PORT)."""
    seed: int = field(default=1, metadata=FIXED)
    """seed of model initialisation, data order and worker randomness."""
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

    # --- translation: corpus, subwords, batches, model, search --------------------------------------
    train_src: str = field(default="", metadata=FIXED)
    """training source text (UTF-8, one sentence per line); default: the bundled English-German Bible."""
    train_tgt: str = field(default="", metadata=FIXED)
    """training target text, line-parallel to --train-src."""
    dev_src: str = ""
    """dev source text (validation BLEU)."""
    dev_tgt: str = ""
    """dev target text (references)."""
    test_src: str = ""
    """test source text (BLEU at the end); optional."""
    test_tgt: str = ""
    """test target text (references)."""
    vocab_size: int = field(default=2000, metadata=FIXED)
    """joint sentencepiece vocabulary size."""
    max_len: int = field(default=40, metadata=FIXED)
    """training pairs with a side longer than this many subwords are skipped."""
    batch_tokens: int = field(default=2500, metadata=FIXED)
    """tokens per batch (padded source or target, whichever is longer): memory-sized batches."""
    preset: str = field(default="tiny", metadata=FIXED)
    """model preset: tiny (CPU), base (the paper's 6+6 Transformer, GPUs), rnn-tiny, rnn-base."""
    dropout: float | None = None
    """dropout (default: the preset's)."""
    rnn_cell: str = field(default="gru", metadata=FIXED)
    """gru or lstm, for the rnn presets."""
    positions: str = field(default="", metadata=FIXED)
    """transformer positions: sinusoidal or learned (default: the preset's)."""
    prenorm: bool | None = field(default=None, metadata=FIXED)
    """transformer layer norm before (pre-norm) or after (post-norm) each sublayer (default: the preset's)."""
    label_smoothing: float = 0.1
    """label smoothing of the training loss."""
    beam: int = 1
    """beam size for validation and test decoding (1 = greedy)."""
    length_penalty: float = 0.6
    """GNMT length penalty exponent for beam search."""
    valid_sentences: int = 0
    """decode only the first this many dev sentences at each validation (0 = all)."""
    bleu_targets: str = ""
    """comma list of dev BLEU scores whose first wall time and update are reported (e.g. 10,15,20)."""

    # --- optimiser -----------------------------------------------------------------------------
    lr: float = 3e-3
    """peak learning rate. The loss is a sum over tokens, so a summed update of G gradients
    weights every token equally; Adam is invariant to the gradient's scale, so lr need not
    change with G or batch size (the step size is lr whatever their product)."""
    schedule: str = "inverse-sqrt"
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

    # --- stopping, validation, output ------------------------------------------------------------
    max_updates: int = 0
    """stop after this many server updates (0 = no limit)."""
    max_epochs: float = 0.0
    """stop when a worker finishes this many passes over its shard (0 = no limit); a fraction
    counts batches into the last pass (2.5 stops halfway through a worker's third pass)."""
    max_time: float = 480.0
    """stop after this many seconds of training (0 = no limit); the default job trains for 8
    minutes, then validates and decodes the test set, within 10 minutes on 2 cores."""
    valid_every_tokens: int = 800_000
    """validate every this many target tokens the workers have trained on (0 = only at the end):
    every method is then validated at the same training progress, whatever its G or k."""
    valid_every: int = 0
    """validate every this many server updates instead of by tokens (0 = use --valid-every-tokens)."""
    valid_process: bool = True
    """validate real-process runs in their own process (pyasgd-valid) at a lower CPU priority,
    so the workers keep their cores; --no-valid-process validates in the launcher."""
    patience: int = 0
    """stop after this many validations without improvement (0 = never; the paper used 5)."""
    patience_metric: str = ""
    """the dev metric --patience watches: loss (dev cross-entropy per target token, as the paper),
    bleu, or empty for the task's primary metric (BLEU for translation)."""
    save_every: int = 0
    """checkpoint every this many server updates (0 = only at the end)."""
    out: str = ""
    """run directory; default runs/<timestamp>-<mode>."""
    resume: str = ""
    """continue the run in this directory from its last checkpoint."""
    quiet: bool = False
    """no progress bar."""
    timeout: float = 120.0
    """seconds a process may wait on another (a full ring, a barrier) before the run fails."""
    max_restarts: int = 3
    """worker processes that may die (killed, an exception, out of memory) and be replaced in a
    run before it stops; 0 = any death ends the run. A replacement pulls the current parameters
    and continues from its rank's data position; the server cannot be replaced."""

    # --- simulator ----------------------------------------------------------------------------
    simulate: bool = False
    """run the N workers as virtual workers in one process: deterministic and fast."""
    sim_order: str = "round-robin"
    """arrival order in the simulator: round-robin (ideal async staleness N-1) or normal
    (compute times drawn from a normal distribution)."""
    sim_time_std: float = 0.3
    """with --sim-order normal: the jitter of each compute time (its relative standard deviation:
    a time is multiplied by max(0.05, Normal(1, std)))."""
    sim_speeds: str = ""
    """the virtual workers' relative compute times, a comma list of N numbers (1,1,1,2: the
    last worker is 2x slower, a straggler); empty = all 1."""
    sim_wps: float = 5000.0
    """the virtual clock's unit: target tokens per virtual second of a speed-1 worker. A batch of
    T target tokens takes speed * T / sim_wps virtual seconds (times the jitter)."""

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{_opt(name)}: {msg}")

        need(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        need(self.workers >= 1, "workers", f"need at least 1 worker, got {self.workers}")
        need(self.nnodes >= 1, "nnodes", f"need at least 1 node, got {self.nnodes}")
        need(0 <= self.node_rank < self.nnodes, "node_rank",
             f"must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1:
            need(1 <= self.master_port <= 65535, "master_port",
                 f"a multi-node run needs node 0's TCP port (1..65535), got {self.master_port}")
            need(bool(self.master_addr.strip()), "master_addr", "give node 0's address (a host name or IP)")
            need(not self.simulate, "nnodes", "--simulate runs every worker in one process; drop --nnodes")
            need(not (self.mode == "async" and self.clip_norm > 0), "clip_norm",
                 "the sharded server across nodes cannot clip the global norm (each node holds one shard of the "
                 "gradient); drop --clip-norm or use --mode sync")
        need(self.local_accum >= 1, "local_accum", f"must be >= 1, got {self.local_accum}")
        need(self.pull_every >= 1, "pull_every", f"must be >= 1, got {self.pull_every}")
        if self.global_accum is not None:
            need(self.global_accum >= 1, "global_accum", f"must be >= 1, got {self.global_accum}")
            if self.mode == "sync":
                need(self.global_accum == self.total_workers, "global_accum",
                     f"sync mode sums exactly one gradient per worker (G = M x N = {self.total_workers}); "
                     f"drop --global-accum or set it to {self.total_workers}")
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        need(self.warmup >= 0, "warmup", "must be >= 0")
        need(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        need(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        need(self.eps >= 0, "eps", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.clip_norm >= 0, "clip_norm", "must be >= 0 (0 turns clipping off)")
        for name in ("max_updates", "valid_every", "valid_every_tokens", "patience", "save_every", "threads", "max_restarts"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("max_epochs", "max_time", "compute_delay"):
            need(getattr(self, name) >= 0, name, "must be >= 0 (0 = no limit)")
        need(self.max_updates > 0 or self.max_epochs > 0 or self.max_time > 0, "max_updates",
             "set at least one of --max-updates, --max-epochs, --max-time so the run ends")
        need(self.timeout > 0, "timeout", "must be > 0 seconds")
        need(self.amp in AMP, "amp", f"must be one of {', '.join(AMP)}, got {self.amp!r}")
        need(self.grad_dtype in GRAD_DTYPES, "grad_dtype",
             f"must be one of {', '.join(GRAD_DTYPES)}, got {self.grad_dtype!r}")
        need(self.sim_order in SIM_ORDERS, "sim_order", f"must be one of {', '.join(SIM_ORDERS)}")
        need(self.sim_time_std >= 0, "sim_time_std", "must be >= 0")
        need(self.sim_wps > 0, "sim_wps", f"must be > 0, got {self.sim_wps}")
        self.worker_speeds()  # validates --sim-speeds
        self.slowdowns()  # validates --worker-slowdown
        need(self.patience_metric in PATIENCE_METRICS, "patience_metric",
             f"must be loss or bleu (or empty for the task's primary metric), got {self.patience_metric!r}")
        need(not (self.patience_metric == "bleu" and self.task != "translation"), "patience_metric",
             f"bleu needs the translation task; the {self.task} task has loss")
        for name in ("batch_size", "seq_len", "train_size"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.vocab >= 2, "vocab", "must be >= 2")
        self.stale_drop()  # validates the policy's syntax
        self.worker_devices()
        need(self.server_device == "cpu" or self.server_device.startswith("cuda"), "server_device",
             f"must be cpu or cuda[:I], got {self.server_device!r}")
        if self.server_device.startswith("cuda"):
            _check_cuda_device("server_device", self.server_device)
        need(self.task in ("translation", "synthetic"), "task", f"must be translation or synthetic, got {self.task!r}")
        need(self.vocab_size >= 8, "vocab_size", "must be >= 8")
        need(self.max_len >= 1, "max_len", "must be >= 1")
        need(self.batch_tokens >= self.max_len + 1, "batch_tokens", f"must hold at least one sentence (>= {self.max_len + 1})")
        need(self.beam >= 1, "beam", "must be >= 1")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(self.dropout is None or 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        need(self.rnn_cell in ("gru", "lstm"), "rnn_cell", "must be gru or lstm")
        need(self.positions in ("", "sinusoidal", "learned"), "positions", "must be sinusoidal or learned")
        need(self.valid_sentences >= 0, "valid_sentences", "must be >= 0")
        from pyasgd.models import PRESETS

        need(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}")
        self.targets()
        need(self.task != "synthetic" or self.train_size >= self.total_workers * self.batch_size, "train_size",
             f"{self.train_size} sequences cannot give each of {self.total_workers} workers a batch of "
             f"{self.batch_size}; raise --train-size or lower --batch-size")

    # --- derived settings --------------------------------------------------------------------
    @property
    def total_workers(self) -> int:
        """M x N: the workers of every node (what G, the data shards and staleness count)."""
        return self.nnodes * self.workers

    def global_rank(self, rank: int) -> int:
        """Local worker `rank`'s rank among all M x N workers: R x N + rank."""
        return self.node_rank * self.workers + rank

    @property
    def G(self) -> int:
        """Gradients per server update, counted over all M x N workers."""
        if self.mode == "sync":
            return self.total_workers
        return self.global_accum or self.total_workers

    def stale_drop(self) -> int | None:
        """T of drop:T, else None (and raises ConfigError on a malformed policy)."""
        p = self.stale_policy
        if p in ("none", "scale"):
            return None
        if p.startswith("drop:"):
            try:
                t = int(p[5:])
            except ValueError:
                t = -1
            if t >= 0:
                return t
        raise ConfigError(f"--stale-policy: must be none, scale or drop:T with an integer T >= 0, got {p!r}")

    def slowdowns(self) -> dict[int, float]:
        """{rank: factor} of --worker-slowdown."""
        out: dict[int, float] = {}
        for item in (x.strip() for x in self.worker_slowdown.split(",") if x.strip()):
            rank, _, factor = item.partition(":")
            try:
                r, f = int(rank), float(factor)
            except ValueError:
                raise ConfigError(f"--worker-slowdown: give RANK:FACTOR pairs such as 3:2, got {item!r}") from None
            if not 0 <= r < self.workers:
                raise ConfigError(f"--worker-slowdown: rank {r} is not a worker (0..{self.workers - 1})")
            if not (1 <= f < float("inf")):
                raise ConfigError(f"--worker-slowdown: the factor must be a finite number >= 1, got {factor!r}")
            out[r] = f
        return out

    def worker_speeds(self) -> list[float]:
        """Each virtual worker's relative compute time (--sim-speeds)."""
        if not self.sim_speeds.strip():
            return [1.0] * self.workers
        try:
            speeds = [float(x) for x in self.sim_speeds.split(",")]
        except ValueError:
            raise ConfigError(f"--sim-speeds: give a comma list of numbers, got {self.sim_speeds!r}") from None
        if len(speeds) != self.workers:
            raise ConfigError(f"--sim-speeds: give one number per worker ({self.workers}), got {len(speeds)}")
        if any(not (x > 0) or x == float("inf") for x in speeds):
            raise ConfigError(f"--sim-speeds: every speed must be a positive finite number, got {self.sim_speeds!r}")
        return speeds

    def targets(self) -> list[float]:
        try:
            return [float(x) for x in self.bleu_targets.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--bleu-targets: give a comma list of numbers, got {self.bleu_targets!r}") from None

    def worker_devices(self) -> list[str]:
        devs = [d.strip() for d in self.devices.split(",") if d.strip()]
        if not devs:
            raise ConfigError("--devices: give cpu or a comma list of cuda:I")
        for d in devs:
            if d != "cpu" and not d.startswith("cuda"):
                raise ConfigError(f"--devices: unknown device {d!r}; use cpu or cuda:I")
            if d.startswith("cuda"):
                _check_cuda_device("devices", d)
        return [devs[i % len(devs)] for i in range(self.workers)]

    def worker_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    # --- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {}
        for k, v in d.items():
            key = k.replace("-", "_")
            if key not in names:
                raise ConfigError(f"{source}: unknown setting {k!r}; see pyasgd-train --help")
            clean[key] = v
        return cls(**clean)

    @classmethod
    def from_toml(cls, path: str) -> TrainConfig:
        return cls.from_dict(load_toml(path), source=path)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def resume_fixed_fields() -> list[str]:
    """The settings a resumed run must share with the run it continues."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume") == "fixed"]


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path!r}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None


def _check_cuda_device(option: str, dev: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{_opt(option)}: {dev} asked for but CUDA is not available here; use cpu")
    idx = int(dev.split(":")[1]) if ":" in dev else 0
    if idx >= torch.cuda.device_count():
        raise ConfigError(f"{_opt(option)}: {dev} does not exist ({torch.cuda.device_count()} CUDA devices)")


def field_docs(cls=TrainConfig) -> dict[str, str]:
    """Each field's docstring (the string literal under it), for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
