"""What every section of the training config shares: the fixed sets of values, the field
metadata, the checks (a setting's type, then its value; every message is one line naming the
option), each field's docstring, and reading TOML. Nothing here touches the machine."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import numbers
import sys
import textwrap
import typing
from typing import Any

from pyasgd.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODES = ("sync", "async")
TASKS = ("translation", "synthetic")
SCHEDULES = ("inverse-sqrt", "constant")
SIM_ORDERS = ("round-robin", "normal")
PATIENCE_METRICS = ("", "loss", "bleu")
AMP = ("none", "bf16")
GRAD_DTYPES = ("fp32", "bf16")
LOG_LEVELS = ("debug", "info", "warning", "error")
RNN_CELLS = ("gru", "lstm")
POSITIONS = ("", "sinusoidal", "learned")
# Marks a setting that shapes the model or the data: a resumed run must keep it (see rundir.py).
FIXED = {"resume": "fixed"}


def preset_names() -> tuple[str, ...]:
    """The model presets (pyasgd.models, imported when first asked: it imports torch)."""
    from pyasgd.models import PRESETS

    return tuple(PRESETS)


def opt(name: str) -> str:
    """A setting's command-line option: max_updates -> --max-updates."""
    return "--" + name.replace("_", "-")


def need(cond: bool, name: str, msg: str) -> None:
    """Raise the one-line ConfigError `--name: msg` unless `cond`."""
    if not cond:
        raise ConfigError(f"{opt(name)}: {msg}")


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The fixed set of values a field takes, if it has one ("" among them means: the default)."""
    c = f.metadata.get("choices")
    return c() if callable(c) else c


def check_choice(obj: Any, name: str, what: str = "") -> None:
    """The field `name` of `obj` holds one of its choices."""
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    values = choices_of(f)
    value = getattr(obj, name)
    named = [v for v in values if v]
    need(value in values, name, f"must be {', '.join(named[:-1])} or {named[-1]}{what}, got {value!r}"
         if len(named) > 1 else f"must be {named[0]}{what}, got {value!r}")


# -- types ------------------------------------------------------------------------------------
EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """{field: (its type, whether None is allowed)} of a section dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        base = [t for t in args if t is not type(None)]
        assert len(base) == 1 and base[0] in EXPECTED, f"{cls.__name__}.{f.name}: unsupported type {hints[f.name]}"
        out[f.name] = (base[0], type(None) in args)
    return out


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for t, word in ((int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"), (dict, "a table")):
        if isinstance(value, t):
            return word
    return f"a {type(value).__name__}"


def _show(value: Any) -> str:
    text = repr(value)  # one line, whatever the value (a string's newlines are escaped)
    return text if len(text) <= 60 else text[:57] + "..."


def checked_value(name: str, value: Any, base: type, optional: bool) -> Any:
    """`value` for a field of type `base` (an int passes as a float, a bool never as a number;
    None only where the field allows it), else a one-line ConfigError naming the option."""
    if value is None:
        if optional:
            return None
    elif base is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool):
        pass
    elif base is int:
        if isinstance(value, numbers.Integral):
            return int(value)
    elif base is float:
        if isinstance(value, numbers.Real):
            return float(value)
    elif isinstance(value, str):
        return value
    expected = EXPECTED[base] + (" or null" if optional else "")
    got = "null" if value is None else f"{_show(value)} ({_kind(value)})"
    raise ConfigError(f"{opt(name)}: expected {expected}, got {got}")


def check_types(section: Any) -> None:
    """Check (and normalise: 2 -> 2.0 for a float) every field of a section; the first step of each
    section's __post_init__, so wrong types fail before a value check compares them."""
    for name, (base, optional) in field_types(type(section)).items():
        setattr(section, name, checked_value(name, getattr(section, name), base, optional))


# -- the machine (at launch only) ---------------------------------------------------------------
def check_cuda_device(option: str, dev: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{opt(option)}: {dev} asked for but CUDA is not available here; use cpu")
    try:
        idx = int(dev.split(":")[1]) if ":" in dev else 0
    except ValueError:
        raise ConfigError(f"{opt(option)}: {dev!r} is not a device; use cuda:I with an integer I") from None
    if not 0 <= idx < torch.cuda.device_count():
        raise ConfigError(f"{opt(option)}: {dev} does not exist ({torch.cuda.device_count()} CUDA devices)")


# -- docs and files -----------------------------------------------------------------------------
def section_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it) of one dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path!r}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {path!r} is a directory, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not valid TOML: not UTF-8 text") from None
