"""The settings a launcher's environment implies: torchrun (or any launcher that uses its names)
started one pyasgd-train per node (--nproc-per-node 1) and says in WORLD_SIZE, RANK, MASTER_ADDR
and MASTER_PORT how many nodes there are, which this one is and where node 0 listens."""
from __future__ import annotations

from typing import Any, Mapping

from pyasgd.errors import ConfigError

# torchrun's variable -> the setting it stands for
TORCHRUN_ENV = {"WORLD_SIZE": "nnodes", "RANK": "node_rank", "MASTER_ADDR": "master_addr", "MASTER_PORT": "master_port"}


def torchrun_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """The flat settings (TrainConfig's names) the environment gives; empty outside torchrun. The
    command line and --config win over them (the CLI's choice)."""
    local = environ.get("LOCAL_WORLD_SIZE")
    if local not in (None, "", "1"):
        raise ConfigError(f"torchrun started {local} processes on this node: run one pyasgd-train per node "
                          "(torchrun --nproc-per-node 1); --workers sets the worker processes of each node")
    out: dict[str, Any] = {}
    for var, name in TORCHRUN_ENV.items():
        value: Any = environ.get(var, "")
        if not value:
            continue
        if name != "master_addr":
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"${var} (torchrun's, for --{name.replace('_', '-')}) must be an integer, "
                                  f"got {value!r}") from None
        out[name] = value
    return out
