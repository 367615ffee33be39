"""pyasgd: asynchronous SGD for neural machine translation on one node, with the global gradient
accumulation that makes asynchrony work for Transformers (Aji & Heafield, 2019)."""
from pyasgd.core.fused import FusedAdam, fused_adam_step
from pyasgd.trainer.launch import train

__version__ = "0.1.0"
__all__ = ["FusedAdam", "fused_adam_step", "train", "__version__"]
