"""The run directory: created (or reopened for --resume) before anything starts, so a bad
--out fails fast; summary.json is written last and atomically, so only a run that ended has one."""
from __future__ import annotations

import json
import os
import time

from pyasgd.config import ConfigError, TrainConfig

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
# Settings a resumed run must share with the run it continues (they shape the model or data).
SHAPE_FIELDS = ("task", "workers", "seed", "vocab", "seq_len", "train_size", "batch_size", "vocab_size",
                "max_len", "batch_tokens", "preset", "rnn_cell", "positions", "prenorm", "train_src", "train_tgt")


def prepare(config: TrainConfig) -> str:
    if config.resume:
        d = config.resume
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise ConfigError(f"--resume: {d!r} is not a run directory (no config.json)")
        if not os.path.isfile(os.path.join(d, CHECKPOINT)):
            raise ConfigError(f"--resume: {d!r} has no {CHECKPOINT} to continue from")
        with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        for name in SHAPE_FIELDS:
            if name in saved and saved[name] != getattr(config, name):
                raise ConfigError(f"--resume: --{name.replace('_', '-')} is {getattr(config, name)!r} but the run "
                                  f"in {d} used {saved[name]!r}; a resumed run must keep it")
        if os.path.exists(os.path.join(d, "summary.json")):
            os.replace(os.path.join(d, "summary.json"), os.path.join(d, "summary.prev.json"))
    else:
        d = config.out or os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{config.mode}")
        if os.path.exists(os.path.join(d, "config.json")):
            raise ConfigError(f"--out: {d!r} already holds a run; pass --resume {d} to continue it, "
                              f"or choose another --out")
        os.makedirs(d, exist_ok=True)
    write_json(os.path.join(d, "config.json"), config.to_dict())
    return d


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
