"""Public alias: `pyasgd.optim.FusedAdam` and `pyasgd.optim.fused_adam_step` (they live in
pyasgd/core/fused.py)."""
from pyasgd.core.fused import FusedAdam, fused_adam_step

__all__ = ["FusedAdam", "fused_adam_step"]
