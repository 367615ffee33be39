"""A short version of the fault-injection soak (benchmarks/soak.py): faults not exercised by the
trainer tests (a FIFO and a foreign file under /dev/shm/pyasgd-*, a corrupted header, a worker
raising once), and the ring's conservation with a pusher SIGKILLed mid-push, repeatedly."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import soak  # noqa: E402


@pytest.mark.slow
def test_short_soak_finds_nothing(tmp_path, capsys):
    rc = soak.main(["--runs", "4", "--faults", "fifo,foreign_file,corrupt_header,worker_raise",
                    "--translation-every", "0", "--ring-rounds", "0", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| fifo | 1 | 1 | 0 | 0 | 0 |" in out and "| worker_raise | 1 | 1 | 0 | 0 | 0 |" in out


@pytest.mark.slow
def test_ring_conserves_gradients_while_a_pusher_is_killed_again_and_again():
    r = soak.ring_check(rounds=4, pushes=150, n=200_003)
    assert r["kills"] == 4 and r["doubled"] == 0 and r["lost"] == 0 and r["problems"] == [], r
    assert r["collected"] >= 3 * 150 + 4  # every steady push, and each victim's before it died
