"""The syntax of --stale-policy and --predict (what they mean: pyasgd/trainer/compensate.py)."""
from __future__ import annotations

import math
from functools import lru_cache


@lru_cache(maxsize=64)  # the server asks at every update
def parse_policy(p: str) -> tuple[str, float | int | None]:
    """("none"|"scale"|"drop"|"dc"|"dc-adaptive"|"momentum", its argument); ValueError on bad syntax."""
    if p in ("none", "scale", "momentum"):
        return p, None
    kind, _, arg = p.partition(":")
    if kind == "drop":
        try:
            t = int(arg)
        except ValueError:
            t = -1
        if t >= 0:
            return kind, t
    if kind in ("dc", "dc-adaptive"):
        try:
            lam = float(arg)
        except ValueError:
            lam = -1.0
        if lam > 0 and math.isfinite(lam):
            return kind, lam
    raise ValueError(f"--stale-policy: must be none, scale, drop:T (an integer T >= 0), dc:L or dc-adaptive:L "
                     f"(a number L > 0) or momentum, got {p!r}")


def parse_predict(p: str) -> float | None:
    """S of --predict: None for auto, else a number >= 0; ValueError on bad syntax."""
    if p == "auto":
        return None
    try:
        s = float(p)
    except ValueError:
        s = -1.0
    if s >= 0 and math.isfinite(s):
        return s
    raise ValueError(f"--predict: must be auto or a number >= 0 (0 turns prediction off), got {p!r}")
