"""What a run tells its user (pyasgd/trainer/console.py), as a user sees it: pyasgd-train run as a
program, its stderr piped (a log file) or a terminal (a pty), train.log in the run directory, the
phases announced, --quiet and --log-level, and the bounded end of a translation run (--no-test,
--test-sentences, decoding that stops an untrained model's loops)."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import children, read_text

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
SYNTH = ["--task", "synthetic", "--max-updates", "60", "--valid-every", "20", "--lr", "2e-3", "--warmup", "10"]


def train_cli(*args, stderr=subprocess.PIPE, timeout=240):
    return subprocess.run([sys.executable, "-m", "pyasgd.trainer.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=timeout)


def log_lines(run_dir) -> list[str]:
    with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
        return f.read().splitlines()


def messages(lines: list[str]) -> list[str]:
    """The lines without their timestamps."""
    return [STAMP.sub("", line) for line in lines]


@pytest.mark.parametrize("real", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["simulated", "real processes"])
def test_a_piped_run_writes_timestamped_lines_without_carriage_returns(tmp_path, real):
    out = tmp_path / "run"
    extra = ["--workers", "2", "--compute-delay", "0.01", "--threads", "1"] if real else ["--simulate", "--workers", "2"]
    r = train_cli(*SYNTH, *extra, "--log-every", "1e-6", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(STAMP.match(line) for line in lines), lines
    said = "\n".join(messages(lines))
    assert "preparing the synthetic task" in said
    if real:
        assert "starting the server and 2 worker processes" in said
        assert "all 2 workers ready" in said and "first update applied" in said
    else:
        assert "simulating 2 virtual workers in one process" in said
    assert "validation at update 20: dev accuracy" in said
    assert re.search(r"update \d+/60, epoch", said)  # a periodic progress line
    assert "stopping (max_updates) at update 60" in said
    assert re.search(r"finished \(max_updates\) after 60 updates, best dev accuracy [\d.]+ \(update \d+\)", said)
    # train.log holds the same lines (the same timestamps too)
    assert log_lines(out) == lines
    assert json.loads(r.stdout.splitlines()[-1])["updates"] == 60  # stdout keeps the one JSON line


def test_quiet_and_log_level_keep_stderr_short_but_train_log_complete(tmp_path):
    quiet = train_cli(*SYNTH, "--simulate", "--quiet", "--out", tmp_path / "q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    warn = train_cli(*SYNTH, "--simulate", "--log-level", "warning", "--out", tmp_path / "w")
    assert warn.returncode == 0 and warn.stderr == ""
    for name in ("q", "w"):
        said = "\n".join(messages(log_lines(tmp_path / name)))
        assert "validation at update 20" in said and "finished (max_updates)" in said


def test_a_resumed_run_appends_to_train_log(tmp_path):
    out = tmp_path / "run"
    assert train_cli(*SYNTH, "--simulate", "--save-every", "20", "--max-updates", "20", "--out", out).returncode == 0
    first = log_lines(out)
    r = train_cli("--resume", out, "--max-updates", "40")
    assert r.returncode == 0, r.stderr
    both = log_lines(out)
    assert both[:len(first)] == first and "resuming from update 20" in "\n".join(both[len(first):])


@pytest.mark.slow
def test_a_failed_run_says_it_once_on_stderr_and_keeps_it_in_train_log(tmp_path):
    """A killed worker with --max-restarts 0: the CLI prints the failure once (no timestamp, as
    every pyasgd-train error); train.log records it too, timestamped."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "pyasgd.trainer.cli", "--task", "synthetic", "--workers", "2",
                          "--max-time", "0", "--max-updates", "100000", "--max-restarts", "0", "--compute-delay",
                          "0.01", "--threads", "1", "--log-every", "0", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").exists() and '"update"' in (out / "metrics.jsonl").read_text()):
            assert time.time() < deadline and p.poll() is None, "the run never started"
            time.sleep(0.2)
        victim = [k for k in children(p.pid) if read_text(f"/proc/{k}/comm").strip() == "pyasgd-worker-1"]
        os.kill(victim[0], signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 1, err
    assert err.count("worker 1 died") == 1, err
    failed = [line for line in err.splitlines() if "training failed" in line]
    assert len(failed) == 1 and failed[0].startswith("pyasgd-train: training failed: worker 1 died"), err
    logged = "\n".join(log_lines(out))
    assert "training failed: worker 1 died" in logged and "all 2 workers ready" in logged


def _run_in_a_terminal(args, timeout=240) -> tuple[int, str]:
    """pyasgd-train with stderr on a pseudo-terminal; returns (exit code, what the terminal showed)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "pyasgd.trainer.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                p.kill()
                pytest.fail("pyasgd-train on a terminal did not finish")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other side closed (Linux: EIO)
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        p.wait(60)
    return p.returncode, shown.decode("utf-8", "replace")


def test_on_a_terminal_a_bar_is_drawn_and_train_log_still_gets_lines(tmp_path):
    out = tmp_path / "run"
    code, shown = _run_in_a_terminal([*SYNTH, "--simulate", "--log-every", "1e-6", "--out", out])
    assert code == 0, shown
    assert "\r" in shown and "upd" in shown  # tqdm redraws its bar in place
    assert "validation at update 20" in shown  # lines are written above the bar
    logged = log_lines(out)
    assert all("\r" not in line and STAMP.match(line) for line in logged)
    said = "\n".join(messages(logged))
    assert re.search(r"update \d+/60, epoch", said) and "finished (max_updates)" in said


# --- the end of a translation run ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pyasgd.data import bible

    pairs = bible.read_tsv_xz(bible.BUNDLED)
    d = tmp_path_factory.mktemp("corpus")
    files = {}
    for split, chunk in (("train", pairs["train"][:300]), ("dev", pairs["dev"][:30]), ("test", pairs["test"][:40])):
        for side, k in (("src", 0), ("tgt", 1)):
            path = d / f"{split}.{side}"
            path.write_text("".join(p[k] + "\n" for p in chunk), encoding="utf-8")
            files[f"--{split}-{side}"] = str(path)
    return [x for kv in files.items() for x in kv] + ["--vocab-size", "400", "--max-len", "60", "--batch-tokens",
                                                      "1200", "--simulate", "--workers", "2", "--max-updates", "4",
                                                      "--valid-every", "0"]


def test_the_final_test_announces_itself_and_test_sentences_limits_it(tmp_path, corpus):
    out = tmp_path / "run"
    r = train_cli(*corpus, "--test-sentences", "7", "--log-every", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    said = "\n".join(messages(r.stderr.splitlines()))
    assert "testing: decoding 7 test sentences, greedy" in said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_sentences"] == 7 and summary["test_bleu"] is not None
    assert (out / "sacrebleu.txt").is_file()


def test_no_test_skips_the_final_test(tmp_path, corpus):
    out = tmp_path / "run"
    r = train_cli(*corpus, "--no-test", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "no final test (--no-test)" in r.stderr and "testing: decoding" not in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_bleu"] is None and summary["best_valid_bleu"] is not None
    assert not (out / "sacrebleu.txt").exists()


# --- decoding an untrained model ---------------------------------------------------------------------

class Parrot(torch.nn.Module):
    """A decoder that always prefers the tokens of `favourites`, in turn (BOS first, the way an
    untrained model often does), and never EOS."""

    def __init__(self, favourites, vocab=12):
        super().__init__()
        self.favourites, self.vocab = favourites, vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def start(self, src):
        return {"rows": src.shape[0]}

    def decode_step(self, token, state, t):
        logits = torch.zeros(token.shape[0], self.vocab)
        for rank, tok in enumerate(self.favourites):
            logits[:, tok] += 10.0 - rank
        order = self.favourites[t % len(self.favourites):] + self.favourites[:t % len(self.favourites)]
        logits[:, order[0]] += 5.0
        return torch.log_softmax(logits, -1), state

    def reorder(self, state, index):
        return {"rows": int(index.numel())}


@pytest.mark.parametrize("beam", [1, 4])
def test_decoding_never_emits_bos_or_pad_and_ends_a_loop(beam):
    from pyasgd.data.subword import BOS, EOS, PAD
    from pyasgd.models.search import beam_search, greedy

    src = torch.ones(3, 5, dtype=torch.long)
    search = (lambda m: greedy(m, src, 50)) if beam == 1 else (lambda m: beam_search(m, src, beam, 50))
    one = search(Parrot([BOS, 7]))  # BOS is masked: 7 wins every step, and 4 of them end the loop
    assert all(h == [7, 7, 7, 7] for h in one), one
    two = search(Parrot([5, 6]))  # 5 6 5 6 5 6: a 2-token group three times
    assert all(h == [5, 6, 5, 6, 5, 6] for h in two), two
    assert all(tok not in (BOS, PAD, EOS) for h in one + two for tok in h)


def test_a_trained_models_output_without_loops_is_untouched():
    from pyasgd.models.search import constrain, looping

    prefix = torch.tensor([[2, 5, 6, 7, 5, 6, 8, 9, 9, 9]])  # BOS, then no group repeated enough
    assert not bool(looping(prefix).any())
    logp = torch.log_softmax(torch.randn(1, 12), -1)
    kept = logp.clone()
    constrain(logp, prefix)
    from pyasgd.data.subword import BOS, PAD

    rest = [i for i in range(12) if i not in (BOS, PAD)]
    assert torch.equal(logp[0, rest], kept[0, rest])
