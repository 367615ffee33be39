"""The errors a user's input can raise, in a module of their own so that every layer (config, data,
run directory) can raise them without importing another layer."""
from __future__ import annotations


class ConfigError(ValueError):
    """An invalid setting; the message names the option and how to fix it."""


class CorpusError(ConfigError):
    """A corpus that cannot be used; the message names the file and what to fix."""


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used (empty, truncated, damaged, or not one pyasgd wrote);
    the message names the file and what is wrong, on one line."""


class MissingExtra(ConfigError):
    """An optional dependency is not installed; the message names the extra that brings it
    (pip install 'pyasgd[plots]', 'pyasgd[tensorboard]')."""


class Terminated(Exception):
    """SIGTERM, raised in the launcher so the run stops as it does on Ctrl-C: the server saves,
    every process is stopped, summary.json says "terminated"."""
