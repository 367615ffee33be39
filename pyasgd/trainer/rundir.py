"""The run directory: created (or reopened for --resume) before anything starts, so a bad
--out fails fast; summary.json is written last and atomically, so only a run that ended has one.
Every file name of a run directory is defined here."""
from __future__ import annotations

import json
import os
import time

from pyasgd.config import TrainConfig, resume_fixed_fields
from pyasgd.errors import ConfigError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PREV_SUMMARY = "summary.prev.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


def prepare(config: TrainConfig, tag: str = "") -> str:
    """The run directory: a resumed one (checked against the config it ran with) or a new one,
    default runs/<timestamp>-<mode><tag> (the topology's tag: nodes may share a filesystem)."""
    if config.resume:
        d = config.resume
        if not os.path.isfile(os.path.join(d, CONFIG)):
            raise ConfigError(f"--resume: {d!r} is not a run directory (no {CONFIG})")
        if not os.path.isfile(os.path.join(d, CHECKPOINT)):
            raise ConfigError(f"--resume: {d!r} has no {CHECKPOINT} to continue from")
        saved = read_json(os.path.join(d, CONFIG))
        for name in resume_fixed_fields():
            if name in saved and saved[name] != getattr(config, name):
                raise ConfigError(f"--resume: --{name.replace('_', '-')} is {getattr(config, name)!r} but the run "
                                  f"in {d} used {saved[name]!r}; a resumed run must keep it")
        if os.path.exists(os.path.join(d, SUMMARY)):
            os.replace(os.path.join(d, SUMMARY), os.path.join(d, PREV_SUMMARY))
    else:
        d = config.out or os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{config.mode}{tag}")
        if os.path.exists(os.path.join(d, CONFIG)):
            raise ConfigError(f"--out: {d!r} already holds a run; pass --resume {d} to continue it, "
                              f"or choose another --out")
        os.makedirs(d, exist_ok=True)
    write_json(os.path.join(d, CONFIG), config.to_dict())
    return d


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
