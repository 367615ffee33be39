"""TrainConfig: a training run's settings, section by section (pyasgd/config/learning.py and
running.py). Every setting also has a flat name, unique across sections, which is its option
(--lr), its key in TOML and in config.json, its keyword (TrainConfig(lr=...)) and an attribute
(config.lr, the same as config.optim.lr)."""
from __future__ import annotations

import dataclasses
import json
import operator
import os
from dataclasses import dataclass, field
from typing import Any

from pyasgd.config.base import check_cuda_device, load_toml, need, section_docs
from pyasgd.config.learning import DataConfig, MethodConfig, ModelConfig, OptimConfig, SyntheticConfig
from pyasgd.config.policy import parse_policy, parse_predict
from pyasgd.config.running import DeviceConfig, NodesConfig, RunConfig, SimConfig, StopConfig, ValidConfig
from pyasgd.errors import ConfigError

# The sections, in the order of --help and of config.json's fields.
SECTIONS: dict[str, type] = {
    "method": MethodConfig, "data": DataConfig, "synthetic": SyntheticConfig, "model": ModelConfig,
    "optim": OptimConfig, "stop": StopConfig, "valid": ValidConfig, "run": RunConfig, "device": DeviceConfig,
    "sim": SimConfig, "nodes": NodesConfig,
}
# Settings each node of a multi-node run chooses for itself; every other setting must be the same
# on every node, and the nodes check it at rendezvous (pyasgd/nodes/rendezvous.py).
PER_NODE = ("node_rank", "out", "resume", "quiet", "devices", "server_device", "threads", "worker_slowdown",
            "valid_process", "master_addr")
# flat name -> its section
_SECTION_OF = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


class _Flat:
    """A setting by its flat name: on a config, its section's field (a write goes there unchecked;
    replace() makes a checked copy); on the class, its default."""

    def __init__(self, section: str, name: str, default: Any) -> None:
        self.section, self.name, self.default = section, name, default
        self.read = operator.attrgetter(f"{section}.{name}")

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self.default
        return self.read(obj)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(getattr(obj, self.section), self.name, value)


@dataclass(kw_only=True, init=False)
class TrainConfig:
    """A training run's settings. Give them by flat name, TrainConfig(workers=4, lr=1e-3), or by
    section, TrainConfig(optim=OptimConfig(lr=1e-3)) (flat names win); each section checks its own
    fields, then __post_init__ checks what spans sections. Nothing is asked of the machine until
    check_devices() (at launch)."""
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    valid: ValidConfig = field(default_factory=ValidConfig)
    run: RunConfig = field(default_factory=RunConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    nodes: NodesConfig = field(default_factory=NodesConfig)

    def __init__(self, **settings: Any) -> None:
        flat: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        whole: dict[str, Any] = {}
        for key, value in settings.items():
            if key in SECTIONS:
                if not isinstance(value, SECTIONS[key]):
                    raise TypeError(f"TrainConfig: {key} must be a {SECTIONS[key].__name__}, "
                                    f"got {type(value).__name__}")
                whole[key] = value
            elif key in _SECTION_OF:
                flat[_SECTION_OF[key]][key] = value
            else:
                raise TypeError(f"TrainConfig got an unexpected setting {key!r}")
        for s, cls in SECTIONS.items():  # a section given whole is copied (and checked again)
            setattr(self, s, dataclasses.replace(whole[s], **flat[s]) if s in whole else cls(**flat[s]))
        self.__post_init__()

    def __post_init__(self) -> None:
        """The checks that span sections."""
        if self.nnodes > 1:
            need(not self.simulate, "nnodes", "--simulate runs every worker in one process; drop --nnodes")
            need(not (self.mode == "async" and self.clip_norm > 0), "clip_norm",
                 "the sharded server across nodes cannot clip the global norm (each node holds one shard of the "
                 "gradient); drop --clip-norm or use --mode sync")
            need(not (self.mode == "async" and self.eval_copy), "predict" if self.predict_s() > 0 else "ema",
                 "the sharded server across nodes publishes shards, and node 0 validates what is published: "
                 "--predict and --ema need one node or --mode sync across nodes")
        if self.mode == "sync" and self.global_accum is not None:
            need(self.global_accum == self.total_workers, "global_accum",
                 f"sync mode sums exactly one gradient per worker (G = M x N = {self.total_workers}); "
                 f"add --mode async for asynchronous SGD, or drop --global-accum")
        if self.mode == "sync" and self.pull_every == 1:
            need(self.predict in ("0", "0.0") or parse_predict(self.predict) not in (None, 0.0), "predict",
                 "sync mode has no staleness to predict over (auto gives S = 0); add --mode async "
                 "(asynchronous SGD with global accumulation), or --pull-every U, or drop --predict")
            kind, _ = parse_policy(self.stale_policy)
            need(kind in ("none", "scale", "drop"), "stale_policy",
                 f"{kind} compensates stale gradients, and sync mode has none; add --mode async, "
                 f"or --pull-every U, or drop --stale-policy")
        self.worker_speeds()  # one per worker
        self.slowdowns()  # ranks that exist
        need(not (self.patience_metric == "bleu" and self.task != "translation"), "patience_metric",
             f"bleu needs the translation task; the {self.task} task has loss")
        need(self.task != "synthetic" or self.train_size >= self.total_workers * self.batch_size, "train_size",
             f"{self.train_size} sequences cannot give each of {self.total_workers} workers a batch of "
             f"{self.batch_size}; raise --train-size or lower --batch-size")

    def check_devices(self) -> None:
        """That the CUDA devices named exist on this machine. At launch (train() calls it), never when
        a config is made: a GPU run's config loads anywhere (to translate, to report, to resume)."""
        for d in dict.fromkeys(self.device.device_list()):
            if d.startswith("cuda"):
                check_cuda_device("devices", d)
        if self.server_device.startswith("cuda"):
            check_cuda_device("server_device", self.server_device)

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
        """T of drop:T, else None."""
        return self.method.stale_drop()

    def predict_s(self) -> float:
        """S of --predict (auto: the expected staleness (N-1)/G, 0 in sync); 0 = off."""
        s = parse_predict(self.predict)
        return self.expected_staleness() if s is None else s

    def expected_staleness(self) -> float:
        """Mean staleness with equally fast workers: a gradient waits for the others' (N - 1) / G
        updates in async (0 in sync), and a pull every U updates adds (U - 1) / 2 on average."""
        wait = 0.0 if self.mode == "sync" else (self.total_workers - 1) / self.G
        return wait + (self.pull_every - 1) / 2

    @property
    def eval_copy(self) -> bool:
        """Validation evaluates parameters other than the published ones (--predict, --ema)."""
        return self.predict_s() > 0 or self.ema > 0

    def slowdowns(self) -> dict[int, float]:
        """{rank: factor} of --worker-slowdown."""
        out = self.device.slowdown_factors()
        for r in out:
            if not 0 <= r < self.workers:
                raise ConfigError(f"--worker-slowdown: rank {r} is not a worker (0..{self.workers - 1})")
        return out

    def worker_speeds(self) -> list[float]:
        """Each virtual worker's relative compute time (--sim-speeds)."""
        speeds = self.sim.speeds()
        if speeds is None:
            return [1.0] * self.workers
        if len(speeds) != self.workers:
            raise ConfigError(f"--sim-speeds: give one number per worker ({self.workers}), got {len(speeds)}")
        return speeds

    def targets(self) -> list[float]:
        """The dev BLEU scores of --bleu-targets."""
        return self.valid.targets()

    def worker_devices(self) -> list[str]:
        """Each local worker's device: --devices round-robin."""
        devs = self.device.device_list()
        return [devs[i % len(devs)] for i in range(self.workers)]

    def worker_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    # --- fields, copies, (de)serialisation ---------------------------------------------------------
    @classmethod
    def flat_fields(cls) -> list[tuple[str, dataclasses.Field]]:
        """(section, field) of every setting, in order (the sections', then each section's fields)."""
        return [(s, f) for s, c in SECTIONS.items() for f in dataclasses.fields(c)]

    @classmethod
    def field_names(cls) -> list[str]:
        """Every setting's flat name, in order: what dataclasses.fields() of a flat config listed."""
        return list(_SECTION_OF)

    def replace(self, **settings: Any) -> TrainConfig:
        """A copy with some settings changed (by flat name or by section), checked again."""
        return TrainConfig(**{s: getattr(self, s) for s in SECTIONS}, **settings)

    def to_dict(self) -> dict[str, Any]:
        """The settings by flat name (what config.json holds)."""
        return {name: getattr(getattr(self, s), name) for name, s in _SECTION_OF.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """A config from flat settings (TOML, config.json, options); a key may use - for _."""
        clean = {}
        for k, v in d.items():
            key = str(k).replace("-", "_")
            if key in SECTIONS and isinstance(v, dict):
                raise ConfigError(f"{source}: [{k}]: give the settings by their flat names, outside any table "
                                  f"(e.g. {dataclasses.fields(SECTIONS[key])[0].name} = ...)")
            if key not in _SECTION_OF:
                raise ConfigError(f"{source}: unknown setting {k!r}; see pyasgd-train --help")
            clean[key] = v
        return cls(**clean)

    @classmethod
    def from_toml(cls, path: str) -> TrainConfig:
        return cls.from_dict(load_toml(path), source=path)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


for _section, _cls in SECTIONS.items():
    for _f in dataclasses.fields(_cls):
        assert not hasattr(TrainConfig, _f.name), f"the setting {_f.name} hides TrainConfig.{_f.name}"
        setattr(TrainConfig, _f.name, _Flat(_section, _f.name, _f.default))
del _section, _cls, _f


def resume_fixed_fields() -> list[str]:
    """The settings a resumed run must share with the run it continues."""
    return [f.name for _, f in TrainConfig.flat_fields() if f.metadata.get("resume") == "fixed"]


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each setting's docstring (the string literal under its field), for --help: of every section,
    or of one section class."""
    if cls is TrainConfig:
        return {k: v for c in SECTIONS.values() for k, v in section_docs(c).items()}
    return section_docs(cls)
