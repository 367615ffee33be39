"""How a run ends, in words and files: the failure texts a user reads (a dead server, a full disk)
and the summary written at the end (across nodes, node 0's is the global one)."""
from __future__ import annotations

import os
from typing import Any

from pyasgd.trainer import rundir
from pyasgd.trainer.runlog import RunLog
from pyasgd.trainer.steps import finish


def after_save_failure(message: str, run_dir: str) -> str:
    """A SaveError's line, with what the user can do next."""
    ckpt = os.path.join(run_dir, rundir.CHECKPOINT)
    if os.path.exists(ckpt):
        return (f"{message}; the last checkpoint written, {ckpt}, is whole: free space, then continue with: "
                f"pyasgd-train --resume {run_dir}")
    return f"{message}; no checkpoint was written yet: free space, then start again"


def server_died(how: str, ckpt_path: str, last_checkpoint: int | None, run_dir: str) -> str:
    """The failure text of a dead server (it cannot be replaced)."""
    where = (f"its last checkpoint, {ckpt_path}, holds update {last_checkpoint}"
             if last_checkpoint is not None and os.path.exists(ckpt_path)
             else "it wrote no checkpoint (set --save-every to keep one)")
    return (f"the server died ({how}); the updates since its last checkpoint are lost and it cannot be "
            f"replaced: {where}. Continue with: pyasgd-train --resume {run_dir}")


def finish_run(log: RunLog, run_dir: str, topology, failure: str, stopped_because: str, wall: float,
               extra: dict) -> dict[str, Any]:
    """Write the run's summary (across nodes, node 0's is the global one) and return it."""
    because = f"failed: {failure.splitlines()[0]}" if failure else str(stopped_because)
    summary = finish(log, run_dir, stopped_because=because, wall_s=wall, extra=extra)
    summary, is_global = topology.gather(summary, failed=bool(failure))
    if is_global:
        rundir.write_json(os.path.join(run_dir, rundir.SUMMARY), summary)
    return summary
