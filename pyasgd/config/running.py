"""The sections of the config that say how a run runs: when it stops, how it validates, where it
writes, on which devices, in the simulator or across nodes. Each field's docstring is its --help;
each section checks its own fields in __post_init__ and touches nothing on the machine
(TrainConfig.check_devices does, at launch)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pyasgd.config.base import (AMP, FIXED, GRAD_DTYPES, LOG_LEVELS, PATIENCE_METRICS, SIM_ORDERS, check_choice, check_types,
                                need)
from pyasgd.errors import ConfigError


def _device_name(d: str) -> bool:
    """cpu, cuda or cuda:I (whether it exists here is check_devices' question)."""
    return d in ("cpu", "cuda") or (d.startswith("cuda:") and d[5:].isascii() and d[5:].isdigit())


@dataclass(kw_only=True)
class StopConfig:
    """When the run ends: an update count, epochs, wall time, or patience."""
    title: ClassVar[str] = "stopping"

    max_updates: int = 0
    """stop after this many server updates (0 = no limit)."""
    max_epochs: float = 0.0
    """stop when a worker finishes this many passes over its shard (0 = no limit); a fraction
    counts batches into the last pass (2.5 stops halfway through a worker's third pass)."""
    max_time: float = 480.0
    """stop after this many seconds of training (0 = no limit); the default job trains for 8
    minutes, then validates and decodes the test set, within 10 minutes on 2 cores."""
    patience: int = 0
    """stop after this many validations without improvement (0 = never; the paper used 5)."""
    patience_metric: str = field(default="", metadata={"choices": PATIENCE_METRICS})
    """the dev metric --patience watches: loss (dev cross-entropy per target token, as the paper)
    or bleu (default: the task's primary metric, BLEU for translation)."""

    def __post_init__(self) -> None:
        check_types(self)
        need(self.max_updates >= 0, "max_updates", "must be >= 0 (0 = no limit)")
        for name in ("max_epochs", "max_time"):
            need(getattr(self, name) >= 0, name, "must be >= 0 (0 = no limit)")
        need(self.max_updates > 0 or self.max_epochs > 0 or self.max_time > 0, "max_updates",
             "set at least one of --max-updates, --max-epochs, --max-time so the run ends")
        need(self.patience >= 0, "patience", "must be >= 0 (0 = never)")
        check_choice(self, "patience_metric", " (or empty for the task's primary metric)")


@dataclass(kw_only=True)
class ValidConfig:
    """How often the dev set is validated, and what is reported."""
    title: ClassVar[str] = "validation"

    valid_every_tokens: int = 800_000
    """validate every this many target tokens the workers have trained on (0 = only at the end):
    every method is then validated at the same training progress, whatever its G or k."""
    valid_every: int = 0
    """validate every this many server updates instead of by tokens (0 = use --valid-every-tokens)."""
    valid_process: bool = True
    """validate real-process runs in their own process (pyasgd-valid) at a lower CPU priority,
    so the workers keep their cores; --no-valid-process validates in the launcher."""
    valid_sentences: int = 0
    """decode only the first this many dev sentences at each validation (0 = all)."""
    bleu_targets: str = ""
    """comma list of dev BLEU scores whose first wall time and update are reported, e.g. 10,15,20
    (default: none)."""
    test: bool = True
    """at the end, decode the test set with the best checkpoint and report its BLEU; --no-test
    skips it (a smoke run, or a run whose test set must stay unseen)."""
    test_sentences: int = 0
    """decode only the first this many test sentences at the end (0 = all)."""

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("valid_every_tokens", "valid_every", "valid_sentences", "test_sentences"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        self.targets()  # the list's syntax

    def targets(self) -> list[float]:
        try:
            return [float(x) for x in self.bleu_targets.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--bleu-targets: give a comma list of numbers, got {self.bleu_targets!r}") from None


@dataclass(kw_only=True)
class RunConfig:
    """The run directory, checkpoints, progress, and what a run survives."""
    title: ClassVar[str] = "run directory and resilience"

    out: str = ""
    """run directory (default: runs/<timestamp>-<mode>)."""
    resume: str = ""
    """continue the run in this directory from its last checkpoint (default: start a new run)."""
    save_every: int = 0
    """checkpoint every this many server updates (0 = only at the end)."""
    quiet: bool = False
    """no progress output: only warnings and errors on stderr (train.log still gets everything)."""
    log_every: float = 30.0
    """seconds between progress lines when stderr is not a terminal (a log file, a pipe); on a
    terminal a progress bar is drawn instead. 0 = lines only at validations, restarts and the end."""
    log_level: str = field(default="info", metadata={"choices": LOG_LEVELS})
    """what stderr shows: debug, info (progress and phases), warning or error; train.log in the run
    directory always gets info and above."""
    tensorboard: bool = False
    """write TensorBoard events to RUN_DIR/tb: loss, learning rate, words/s, staleness (mean and
    histogram), dev BLEU, chrF and loss (needs the extra: pip install 'pyasgd[tensorboard]')."""
    timeout: float = 120.0
    """seconds a process may wait on another (a full ring, a barrier) before the run fails. Across
    nodes a wait for another node that is alive is reported after this long, never failed; a node
    whose heartbeat stops for half of it (at most 30 s) is lost."""
    max_restarts: int = 3
    """worker processes that may die (killed, an exception, out of memory) and be replaced in a
    run before it stops; 0 = any death ends the run. A replacement pulls the current parameters
    and continues from its rank's data position; the server cannot be replaced."""

    def __post_init__(self) -> None:
        check_types(self)
        need(self.save_every >= 0, "save_every", "must be >= 0")
        need(self.log_every >= 0, "log_every", "must be >= 0 seconds (0 = only at validations and the end)")
        check_choice(self, "log_level")
        need(self.timeout > 0, "timeout", "must be > 0 seconds")
        need(self.max_restarts >= 0, "max_restarts", "must be >= 0")


@dataclass(kw_only=True)
class DeviceConfig:
    """Where workers and server compute, in which precision, with how many threads."""
    title: ClassVar[str] = "devices and precision"

    devices: str = "cpu"
    """worker devices: cpu, or a comma list such as cuda:0,cuda:1 (assigned round-robin)."""
    server_device: str = "cpu"
    """where the server runs the fused update: cpu (no master copy: it reads the published
    parameters and writes the new ones into the shared region's back buffer) or cuda:I (master
    parameters on that GPU, copied into the back buffer)."""
    amp: str = field(default="none", metadata={"choices": AMP})
    """mixed precision in the workers: none (fp32) or bf16 (forward and backward under bf16
    autocast, on CUDA and on CPUs that support it); gradients reach the server as --grad-dtype
    says and the parameters stay fp32."""
    grad_dtype: str = field(default="bf16", metadata={"choices": GRAD_DTYPES})
    """the gradients' type on their way to the server: bf16 (each pusher rounds its gradient to
    nearest even as it copies it into its slot; the server widens the values exactly and sums them
    in fp32): half the bytes per push and per gradient the server reads, at the cost of rounding
    every gradient to 8 significant bits (the default job's dev BLEU: 7.91 against 7.99 with fp32,
    two runs each; benchmarks/RESULTS.md); or fp32. The simulator rounds the same way."""
    threads: int = 0
    """torch threads per CPU worker; 0 = floor(cores / workers), at least 1."""
    worker_slowdown: str = ""
    """RANK:FACTOR[,RANK:FACTOR...]: worker RANK sleeps (FACTOR - 1) times its compute time after
    each gradient, standing for a FACTOR-times slower accelerator (real processes; the simulator
    has --sim-speeds). E.g. 3:2 makes worker 3 a 2x straggler (default: none)."""

    def __post_init__(self) -> None:
        check_types(self)
        self.device_list()
        need(_device_name(self.server_device), "server_device",
             f"must be cpu or cuda[:I], got {self.server_device!r}")
        check_choice(self, "amp")
        check_choice(self, "grad_dtype")
        need(self.threads >= 0, "threads", "must be >= 0 (0 = cores / workers)")
        self.slowdown_factors()

    def device_list(self) -> list[str]:
        """--devices as a list, checked for its syntax only (check_devices asks the machine)."""
        devs = [d.strip() for d in self.devices.split(",") if d.strip()]
        if not devs:
            raise ConfigError("--devices: give cpu or a comma list of cuda:I")
        for d in devs:
            if not _device_name(d):
                raise ConfigError(f"--devices: unknown device {d!r}; use cpu or cuda:I")
        return devs

    def slowdown_factors(self) -> dict[int, float]:
        """{rank: factor} of --worker-slowdown (TrainConfig.slowdowns checks the ranks exist)."""
        out: dict[int, float] = {}
        for item in (x.strip() for x in self.worker_slowdown.split(",") if x.strip()):
            rank, _, factor = item.partition(":")
            try:
                r, f = int(rank), float(factor)
            except ValueError:
                raise ConfigError(f"--worker-slowdown: give RANK:FACTOR pairs such as 3:2, got {item!r}") from None
            if not (1 <= f < float("inf")):
                raise ConfigError(f"--worker-slowdown: the factor must be a finite number >= 1, got {factor!r}")
            out[r] = f
        return out


@dataclass(kw_only=True)
class SimConfig:
    """Virtual workers on a virtual clock, all in one process (--simulate)."""
    title: ClassVar[str] = "simulator"

    simulate: bool = False
    """run the N workers as virtual workers in one process: deterministic and fast."""
    sim_order: str = field(default="round-robin", metadata={"choices": SIM_ORDERS})
    """arrival order in the simulator: round-robin (ideal async staleness N-1) or normal
    (compute times drawn from a normal distribution)."""
    sim_time_std: float = 0.3
    """with --sim-order normal: the jitter of each compute time (its relative standard deviation:
    a time is multiplied by max(0.05, Normal(1, std)))."""
    sim_speeds: str = ""
    """the virtual workers' relative compute times, a comma list of N numbers (1,1,1,2: the
    last worker is 2x slower, a straggler); default: all 1."""
    sim_wps: float = 5000.0
    """the virtual clock's unit: target tokens per virtual second of a speed-1 worker. A batch of
    T target tokens takes speed * T / sim_wps virtual seconds (times the jitter)."""

    def __post_init__(self) -> None:
        check_types(self)
        check_choice(self, "sim_order")
        need(self.sim_time_std >= 0, "sim_time_std", f"must be >= 0, got {self.sim_time_std}")
        need(self.sim_wps > 0, "sim_wps", f"must be > 0, got {self.sim_wps}")
        self.speeds()

    def speeds(self) -> list[float] | None:
        """--sim-speeds as numbers, None when empty (TrainConfig.worker_speeds checks one per worker)."""
        if not self.sim_speeds.strip():
            return None
        try:
            speeds = [float(x) for x in self.sim_speeds.split(",")]
        except ValueError:
            raise ConfigError(f"--sim-speeds: give a comma list of numbers, got {self.sim_speeds!r}") from None
        if any(not (x > 0) or x == float("inf") for x in speeds):
            raise ConfigError(f"--sim-speeds: every speed must be a positive finite number, got {self.sim_speeds!r}")
        return speeds


@dataclass(kw_only=True)
class NodesConfig:
    """Several machines, one pyasgd-train on each; under torchrun, its environment fills these."""
    title: ClassVar[str] = "nodes"

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

    def __post_init__(self) -> None:
        check_types(self)
        need(self.nnodes >= 1, "nnodes", f"need at least 1 node, got {self.nnodes}")
        need(0 <= self.node_rank < self.nnodes, "node_rank",
             f"must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1:
            need(1 <= self.master_port <= 65535, "master_port",
                 f"a multi-node run needs node 0's TCP port (1..65535), got {self.master_port}")
            need(bool(self.master_addr.strip()), "master_addr", "give node 0's address (a host name or IP)")
