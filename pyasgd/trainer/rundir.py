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
TRAIN_LOG = "train.log"  # what the run told its user (pyasgd/trainer/console.py)
TENSORBOARD = "tb"  # --tensorboard's event files


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


def check_resume(config: TrainConfig) -> dict | None:
    """What --resume will read, checked before anything in the run directory is touched (before
    prepare() moves summary.json or rewrites config.json, before any process or shared region):
    its config.json (JSON, an object, settings TrainConfig takes) and its checkpoint.pt, whole
    and pyasgd's. Returns the loaded checkpoint (so it is read once), or None without --resume;
    raises ConfigError (CheckpointError for the checkpoint), one line naming the file."""
    if not config.resume:
        return None
    from pyasgd.core import checkpoint

    d = config.resume
    saved_settings(d)
    path = os.path.join(d, CHECKPOINT)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: {d!r} has no {CHECKPOINT} to continue from")
    return checkpoint.load_checked(path, "sim" if config.simulate else "train", context="--resume: ")


def saved_settings(d: str, context: str = "--resume: ") -> dict:
    """The settings in run directory `d`'s config.json, checked: JSON, an object, settings
    TrainConfig takes (else ConfigError, one line, after `context`)."""
    path = os.path.join(d, CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"{context}{d!r} is not a run directory (no {CONFIG})")
    try:
        saved = read_json(path)
    except OSError as e:
        raise ConfigError(f"{context}{path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{context}{path} is not a run's settings (not JSON: {e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{context}{path} is not a run's settings (a JSON {type(saved).__name__}, "
                          f"not an object)")
    try:
        TrainConfig.from_dict(saved, source=path)
    except ConfigError as e:
        text = str(e).removeprefix(f"{path}: ")
        raise ConfigError(f"{context}{path} does not hold settings pyasgd-train takes: {text}") from None
    return saved


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
