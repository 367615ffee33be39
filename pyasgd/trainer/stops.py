"""Why a run stops, and what the launcher asks of the server: enums, not strings parsed back."""
from __future__ import annotations

import enum


class StopReason(str, enum.Enum):
    """Why a run ended (summary.json's stopped_because; str-valued, so it is written as its value)."""
    MAX_UPDATES = "max_updates"
    MAX_EPOCHS = "max_epochs"
    MAX_TIME = "max_time"
    PATIENCE = "patience"
    STOPPED = "stopped"              # asked to stop (by the launcher, or its region closed)
    LAUNCHER_DIED = "launcher died"  # the server's launcher was killed outright
    FAILED = "failed"
    INTERRUPTED = "interrupted"      # Ctrl-C
    TERMINATED = "terminated"        # SIGTERM

    def __str__(self) -> str:
        return self.value


class StopRequest(enum.IntEnum):
    """What the launcher tells the server when it sets the stop event (a shared int)."""
    NONE = 0
    STOP = 1   # end in order (a limit, a signal, patience)
    FAIL = 2   # the run failed: across nodes the server votes FAIL, so the others fail too
