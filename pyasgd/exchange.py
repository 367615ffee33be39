"""Public alias: `pyasgd.exchange.SharedRegion` and its errors (they live in
pyasgd/core/region.py)."""
from pyasgd.core.region import (GradientBatch, RegionClosedError, RegionSpaceError, RegionTimeoutError, SharedRegion,
                                default_slots)

__all__ = ["GradientBatch", "RegionClosedError", "RegionSpaceError", "RegionTimeoutError", "SharedRegion", "default_slots"]
