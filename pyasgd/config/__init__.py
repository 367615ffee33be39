"""TrainConfig: the single source of truth for a training run. Its settings are grouped in
sections (method, data, synthetic, model, optim, stop, valid, run, device, sim, nodes), each a
dataclass whose fields carry their --help as the docstring under them and whose __post_init__
checks them; every setting keeps one flat name for the command line (--lr), TOML and config.json
(`lr`), and Python (TrainConfig(lr=...), config.lr == config.optim.lr). The CLI is generated from
it (pyasgd/trainer/cli.py), `--config FILE` loads TOML onto it, and config.json round-trips it.

    base.py      the fixed sets of values, type and value checks, field docs, TOML
    learning.py  MethodConfig, DataConfig, SyntheticConfig, ModelConfig, OptimConfig
    running.py   StopConfig, ValidConfig, RunConfig, DeviceConfig, SimConfig, NodesConfig
    train.py     TrainConfig (the sections, the checks across them, flat access, serialisation)
"""
from pyasgd.config.base import (AMP, FIXED, GRAD_DTYPES, MODES, PATIENCE_METRICS, POSITIONS, RNN_CELLS, SCHEDULES,
                                SIM_ORDERS, TASKS, load_toml)
from pyasgd.config.learning import DataConfig, MethodConfig, ModelConfig, OptimConfig, SyntheticConfig
from pyasgd.config.running import DeviceConfig, NodesConfig, RunConfig, SimConfig, StopConfig, ValidConfig
from pyasgd.config.train import PER_NODE, SECTIONS, TrainConfig, field_docs, resume_fixed_fields
from pyasgd.errors import ConfigError

__all__ = [
    "TrainConfig", "ConfigError", "load_toml", "resume_fixed_fields", "field_docs", "PER_NODE", "FIXED", "SECTIONS",
    "MethodConfig", "DataConfig", "SyntheticConfig", "ModelConfig", "OptimConfig", "StopConfig", "ValidConfig",
    "RunConfig", "DeviceConfig", "SimConfig", "NodesConfig",
    "MODES", "TASKS", "SCHEDULES", "SIM_ORDERS", "PATIENCE_METRICS", "AMP", "GRAD_DTYPES", "RNN_CELLS", "POSITIONS",
]
