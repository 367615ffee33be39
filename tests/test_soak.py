"""A short version of the fault-injection soaks (benchmarks/soak.py, and --nodes 2): faults not exercised by the
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


@pytest.mark.slow
def test_short_two_node_soak_finds_nothing(tmp_path, capsys):
    """benchmarks/soak.py --nodes 2: a 3x slow node (never called lost, both in the summary) and a
    wrong join token (refused in under 10 s, then the right node joins), sync then async."""
    rc = soak.main(["--nodes", "2", "--runs", "4", "--faults", "slow,wrong_token", "--seed", "3", "--work",
                    str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| slow | 2 | 2 | 0 | 2 | 0 | 0 | 0 |" in out and "| wrong_token | 2 | 2 | 0 | 2 | 0 | 0 | 0 |" in out, out
    assert "slow or healthy nodes called lost: 0 of 4 runs" in out, out
