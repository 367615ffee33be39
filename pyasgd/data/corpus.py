"""Parallel corpora as lists of (source, target) sentence pairs: the bundled Bible corpus or the
user's plain UTF-8 text files (one sentence per line), read with checks that say what is wrong."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from pyasgd.data import bible
from pyasgd.errors import CorpusError


@dataclass
class Corpus:
    train: list[tuple[str, str]]
    dev: list[tuple[str, str]]
    test: list[tuple[str, str]] = field(default_factory=list)
    name: str = ""
    skipped_empty: int = 0


def read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise CorpusError(f"no such file: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}, line {i}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                              f"convert the file to UTF-8") from None
    return out


def read_parallel(src_path: str, tgt_path: str) -> tuple[list[tuple[str, str]], int]:
    """Pairs of non-empty lines, and how many pairs were skipped for an empty side."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise CorpusError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                          f"parallel files need one sentence per line on both sides")
    pairs = [(s.strip(), t.strip()) for s, t in zip(src, tgt)]
    kept = [(s, t) for s, t in pairs if s and t]
    return kept, len(pairs) - len(kept)


def load(config) -> Corpus:
    """The corpus the config names: user files when --train-src is given, else the bundled one."""
    c = config
    if c.train_src or c.train_tgt:
        need = {"--train-src": c.train_src, "--train-tgt": c.train_tgt, "--dev-src": c.dev_src, "--dev-tgt": c.dev_tgt}
        missing = [k for k, v in need.items() if not v]
        if missing:
            raise CorpusError(f"a user corpus needs {', '.join(need)}; missing {', '.join(missing)}")
        if bool(c.test_src) != bool(c.test_tgt):
            raise CorpusError("give both --test-src and --test-tgt, or neither")
        train, e1 = read_parallel(c.train_src, c.train_tgt)
        dev, e2 = read_parallel(c.dev_src, c.dev_tgt)
        test, e3 = read_parallel(c.test_src, c.test_tgt) if c.test_src else ([], 0)
        corpus = Corpus(train, dev, test, name=os.path.basename(c.train_src), skipped_empty=e1 + e2 + e3)
    else:
        splits = bible.read_tsv_xz(bible.BUNDLED)
        corpus = Corpus(splits["train"], splits["dev"], splits["test"], name="bible.en-de")
    if not corpus.train:
        raise CorpusError("the training corpus is empty (no line pair with text on both sides)")
    if not corpus.dev:
        raise CorpusError("the dev corpus is empty (no line pair with text on both sides)")
    return corpus
