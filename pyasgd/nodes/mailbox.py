"""A sharded server's point-to-point traffic between nodes (gloo send/recv on CPU tensors):
fixed-size messages with an int64 header, one receiver thread per peer and channel, one sender
thread per peer, and every event (a message, a lost peer, a failed thread) on one queue for the
server's loop (pyasgd/nodes/sharded.py)."""
from __future__ import annotations

import datetime
import queue
import threading
import time
import traceback

import torch

from pyasgd.errors import first_line

HDR = 8                   # int64 words in every message's header: [kind, ...]
GRAD, UPDATE, ACK, STOP_MSG, FIN_GRADS, FIN_UPDATES, FIN_CTRL = range(1, 8)
DATA, CTRL = 11, 12       # gloo tags: gradients and updates (padded to one size), acks and control
FOREVER = datetime.timedelta(days=365)  # an idle channel is not a failure: lost peers raise at once


class Mailbox:
    """A server's point-to-point traffic: one receiver thread per peer and channel puts every
    message on `events` (as ("msg", src, header, payload)); one sender thread per peer sends in
    order. A lost peer becomes ("lost", peer, text)."""

    def __init__(self, pg, rank: int, size: int, bounds: list[tuple[int, int]], events: queue.Queue) -> None:
        self.pg, self.rank, self.size, self.bounds, self.events = pg, rank, size, bounds, events
        self.width = max(hi - lo for lo, hi in bounds)  # every DATA message carries this many floats
        self.bytes_sent = 0
        self._out = {p: queue.Queue() for p in self.peers}
        self._threads = [threading.Thread(target=self._send_loop, args=(p,), daemon=True, name=f"send-{p}")
                         for p in self.peers]
        self._threads += [threading.Thread(target=self._receive_loop, args=(p, tag), daemon=True,
                                           name=f"recv-{p}-{tag}") for p in self.peers for tag in (DATA, CTRL)]
        for t in self._threads:
            t.start()

    @property
    def peers(self) -> list[int]:
        return [p for p in range(self.size) if p != self.rank]

    def send(self, dst: int, tag: int, header: list[int], payload: torch.Tensor | None = None) -> None:
        size = HDR * 8 + (self.width * 4 if tag == DATA else 0)
        buf = torch.zeros(size, dtype=torch.uint8)
        buf[:HDR * 8].view(torch.int64)[:len(header)] = torch.tensor(header, dtype=torch.int64)
        if payload is not None:
            buf[HDR * 8:HDR * 8 + payload.numel() * 4].view(torch.float32).copy_(payload)
        self.bytes_sent += size
        self._out[dst].put((tag, buf))

    def close(self, timeout: float) -> None:
        """Let the senders finish what is queued, then wait for every thread (the receivers end
        with their channel's last message)."""
        for q in self._out.values():
            q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _transfer(self, op, buf: torch.Tensor, peer: int, tag: int, thread: str) -> bool:
        """One gloo send or recv; a failure becomes an event (a lost peer, or this thread's own
        error, with its traceback) and False."""
        try:
            op([buf], peer, tag).wait(FOREVER)
            return True
        except RuntimeError as e:
            self.events.put(("lost", peer, first_line(e)))
        except Exception:
            self.events.put(("thread_failed", thread, traceback.format_exc()))
        return False

    def _send_loop(self, dst: int) -> None:
        while True:
            item = self._out[dst].get()
            if item is None:
                return
            tag, buf = item
            if not self._transfer(self.pg.send, buf, dst, tag, f"send-{dst}"):
                return

    def _receive_loop(self, src: int, tag: int) -> None:
        size = HDR * 8 + (self.width * 4 if tag == DATA else 0)
        buf = torch.empty(size, dtype=torch.uint8)
        last = FIN_UPDATES if tag == DATA else FIN_CTRL
        while True:
            if not self._transfer(self.pg.recv, buf, src, tag, f"receive-{src}"):
                return
            header = buf[:HDR * 8].view(torch.int64).tolist()
            payload = None
            if header[0] in (GRAD, UPDATE):
                lo, hi = self.bounds[self.rank if header[0] == GRAD else src]
                payload = buf[HDR * 8:HDR * 8 + (hi - lo) * 4].view(torch.float32).clone()
            self.events.put(("msg", src, header, payload))
            if header[0] == last:
                return

