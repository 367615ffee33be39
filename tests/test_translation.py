"""Translation: corpus extraction and checks, subwords, token batches, both models, search,
BLEU, and a short end-to-end run with real processes."""
import json
import os
import sqlite3

import pytest
import torch

from pyasgd.data import bible
from pyasgd.data.batching import epoch_batches, worker_batches
from pyasgd.data.corpus import CorpusError, read_parallel
from pyasgd.data.subword import BOS, EOS, PAD, train_or_load
from pyasgd.models import build, model_config
from pyasgd.models.search import beam_search, greedy


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYASGD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small_pairs():
    return bible.read_tsv_xz(bible.BUNDLED)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# --- corpus -----------------------------------------------------------------------------------

def make_db(path):
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, vText TEXT)")
    rows = []
    verses = {  # book -> [(en, de)]
        1: [("In the beginning `God` [created] it.", "Im Anfang schuf Gott."), ("Same  verse.", "Gleicher Vers."),
            ("", "leer"), ("Same  verse.", "Gleicher Vers.")],  # an empty side, an exact duplicate
        44: [("Acts verse.", "Apostelgeschichte.")],
        45: [("Romans verse.", "Römer."), ("Same  verse.", "Gleicher Vers.")],
    }
    for book, vs in verses.items():
        for v, (en, de) in enumerate(vs, 1):
            rows += [(0, "4", book, 1, v, en), (0, "e", book, 1, v, de), (0, "x", book, 1, v, "other")]
    c.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
    c.commit()
    c.close()


def test_bible_extraction_on_a_small_database(tmp_path, run_main):
    db = str(tmp_path / "bible.db")
    make_db(db)
    splits = bible.extract(db, "4", "e")
    assert splits["train"] == [("In the beginning 'God' created it.", "Im Anfang schuf Gott."),
                               ("Same verse.", "Gleicher Vers.")]  # cleaned, empty and duplicate dropped
    assert splits["dev"] == [("Romans verse.", "Römer."), ("Same verse.", "Gleicher Vers.")]  # no dedupe
    assert splits["test"] == [("Acts verse.", "Apostelgeschichte.")]
    r = run_main(bible.main, "bible", "--db", db, "--src", "4", "--tgt", "e", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "train.4").read_text(encoding="utf-8").splitlines()[1] == "Same verse."
    assert (tmp_path / "out" / "dev.e").read_text(encoding="utf-8").splitlines() == ["Römer.", "Gleicher Vers."]
    r = run_main(bible.main, "bible", "--db", db, "--src", "4", "--tgt", "q", "--out", tmp_path / "bad")
    assert r.returncode == 2 and "--tgt: no translation 'q'" in r.stderr and not (tmp_path / "bad").exists()


def test_bundled_corpus_is_the_issue_split(small_pairs):
    assert 29_000 < len(small_pairs["train"]) < 30_000
    assert len(small_pairs["dev"]) == 433 and len(small_pairs["test"]) == 1007
    assert small_pairs["dev"][0][0].startswith("Paul, a servant of Jesus Christ")
    assert not any("`" in s or "[" in s for s, _ in small_pairs["train"][:2000])


def test_line_count_mismatch_names_both_files(tmp_path):
    a = write_lines(tmp_path / "a.en", ["one", "two", "three"])
    b = write_lines(tmp_path / "b.de", ["eins", "zwei"])
    with pytest.raises(CorpusError, match=r"a\.en has 3 lines but .*b\.de has 2"):
        read_parallel(a, b)


def test_invalid_utf8_names_file_and_line(tmp_path):
    a = write_lines(tmp_path / "a.en", ["one", "two"])
    b = tmp_path / "b.de"
    b.write_bytes(b"eins\nzw\xffei\n")
    with pytest.raises(CorpusError, match=r"b\.de, line 2: not valid UTF-8"):
        read_parallel(a, str(b))


def test_empty_lines_are_skipped_and_counted(tmp_path):
    a = write_lines(tmp_path / "a.en", ["one", "", "three"])
    b = write_lines(tmp_path / "b.de", ["eins", "zwei", "drei"])
    pairs, skipped = read_parallel(a, b)
    assert pairs == [("one", "eins"), ("three", "drei")] and skipped == 1


def user_corpus(tmp_path, pairs, n_train=300, n_dev=40):
    files = {}
    for split, chunk in (("train", pairs["train"][:n_train]), ("dev", pairs["dev"][:n_dev]),
                         ("test", pairs["test"][:n_dev])):
        files[f"{split}_src"] = write_lines(tmp_path / f"{split}.en", [s for s, _ in chunk])
        files[f"{split}_tgt"] = write_lines(tmp_path / f"{split}.de", [t for _, t in chunk])
    return files


@pytest.mark.parametrize("problem,message", [
    ("missing", "no such file"),
    ("empty", "training corpus is empty"),
    ("vocab", "larger than this training text supports"),
    ("mismatch", "has 3 lines but"),
])
def test_bad_corpus_fails_before_a_run_directory_exists(tmp_path, problem, message, run_main, monkeypatch):
    from pyasgd.trainer.cli import main

    train_en = write_lines(tmp_path / "t.en", ["a b c", "d e f", "g h"])
    train_de = write_lines(tmp_path / "t.de", ["x y z", "u v w", "r s"])
    dev = write_lines(tmp_path / "d.txt", ["a b"])
    args = ["--train-src", train_en, "--train-tgt", train_de, "--dev-src", dev, "--dev-tgt", dev, "--vocab-size", "12"]
    if problem == "missing":
        args[1] = str(tmp_path / "nope.en")
    if problem == "empty":
        args[1] = write_lines(tmp_path / "e.en", ["", "", ""])
    if problem == "vocab":
        args[-1] = "5000"
    if problem == "mismatch":
        args[3] = write_lines(tmp_path / "m.de", ["x"])
    monkeypatch.setenv("PYASGD_CACHE", str(tmp_path / "c"))
    r = run_main(main, *args, "--max-time", "5", "--out", tmp_path / "run")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


# --- subwords and batches -------------------------------------------------------------------------

def test_sentencepiece_round_trip_and_cache(small_pairs):
    sw = train_or_load(small_pairs["train"][:2000], 300)
    assert sw.vocab_size == 300
    texts = [s for s, _ in small_pairs["dev"][:50]] + [t for _, t in small_pairs["dev"][:50]]
    assert sw.decode(sw.encode(texts)) == texts
    again = train_or_load(small_pairs["train"][:2000], 300)
    assert again.path == sw.path  # cached by content hash: not trained twice


def test_batches_respect_the_token_limit_and_cover_each_sentence_once(small_pairs):
    sw = train_or_load(small_pairs["train"][:2000], 300)
    src = sw.encode([s for s, _ in small_pairs["train"][:2000]])
    tgt = sw.encode([t for _, t in small_pairs["train"][:2000]])
    keep = [i for i in range(len(src)) if len(src[i]) <= 60 and len(tgt[i]) <= 60]
    src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    limit, workers = 1500, 3
    batches = epoch_batches([len(s) for s in src], [len(t) for t in tgt], limit, seed=1, epoch=0)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(len(src)))  # every sentence exactly once per epoch
    per_worker = []
    for w in range(workers):
        got = []
        for batch, epoch, _ in worker_batches(src, tgt, limit, 1, w, workers, 0, 0):
            B, S = batch.src.shape
            assert B * max(S, batch.tgt_in.shape[1]) <= limit
            assert (batch.tgt_in[:, 0] == BOS).all()
            got.append(batch.tokens)
            if epoch > 0:
                break
        per_worker.append(sum(got))
    assert sum(per_worker) == sum(len(t) + 1 for t in tgt)  # the N shares cover the epoch
    assert epoch_batches([len(s) for s in src], [len(t) for t in tgt], limit, 1, 1) != batches  # reshuffled


# --- models and search ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,extra", [("tiny", {}), ("tiny", dict(prenorm=False, positions="learned")),
                                          ("rnn-tiny", {}),
                                          pytest.param("rnn-tiny", dict(rnn_cell="lstm"), marks=pytest.mark.slow)])
def test_models_forward_backward_and_incremental_decoding(preset, extra):
    torch.manual_seed(0)
    model = build(model_config(preset, dropout=0.0, **extra), vocab=50)
    src = torch.randint(4, 50, (3, 7))
    src[1, 4:] = PAD
    tgt = torch.randint(4, 50, (3, 5))
    tgt[:, 0] = BOS
    logits = model(src, tgt)
    assert logits.shape == (3, 5, 50)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(4, 50, (15,))).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)
    model.eval()
    full = torch.log_softmax(model(src, tgt), -1)
    state = model.start(src)
    for t in range(5):  # one new position per step gives what the whole prefix gives
        logp, state = model.decode_step(tgt[:, t:t + 1], state, t)
        assert torch.allclose(logp, full[:, t], atol=1e-4)
    assert greedy(model, src, 9) == beam_search(model, src, 1, 9)  # beam 1 = greedy
    hyps = beam_search(model, src, 4, 9)
    assert len(hyps) == 3 and all(len(h) <= 9 and EOS not in h for h in hyps)


def test_bleu_of_references_against_themselves_is_100(small_pairs):
    from sacrebleu.metrics import BLEU

    refs = [t for _, t in small_pairs["dev"][:100]]
    assert BLEU().corpus_score(refs, [refs]).score == pytest.approx(100.0)


# --- end to end -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_short_end_to_end_run_and_translate(tmp_path, small_pairs, run_main):
    from pyasgd.trainer.cli import main as train_main
    from pyasgd.tasks.translate_cli import main as translate_main

    files = user_corpus(tmp_path, small_pairs)
    out = tmp_path / "run"
    r = run_main(train_main, *[x for k, v in files.items() for x in (f"--{k.replace('_', '-')}", v)],
                 "--vocab-size", "400", "--max-len", "60", "--batch-tokens", "1200", "--workers", "2",
                 "--max-updates", "0", "--max-time", "20", "--valid-every", "40", "--bleu-targets", "0,99",
                 "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mode", "workers", "local_accum", "global_accum", "pull_every", "updates", "tokens", "wall_s",
                "wps", "avg_staleness", "staleness_hist", "best_valid_bleu", "test_bleu", "stopped_because",
                "time_to_bleu", "test_chrf"):
        assert key in summary, key
    assert summary["global_accum"] == 2 and summary["mode"] == "sync"  # the default: sync, G = N
    assert summary["best_valid_bleu"] is not None and summary["test_bleu"] is not None
    assert summary["time_to_bleu"]["0"] is not None and summary["time_to_bleu"]["99"] is None
    assert {"spm.model", "best.pt", "checkpoint.pt", "sacrebleu.txt", "config.json", "metrics.jsonl"} <= set(os.listdir(out))
    assert "BLEU|" in (out / "sacrebleu.txt").read_text() or "nrefs" in (out / "sacrebleu.txt").read_text()
    src = [s for s, _ in small_pairs["dev"][:5]]
    t = run_main(translate_main, "--checkpoint", out, stdin="\n".join(src) + "\n")
    assert t.returncode == 0, t.stderr
    assert len(t.stdout.splitlines()) == 5
    bad = run_main(translate_main, "--checkpoint", tmp_path, stdin="x\n")
    assert bad.returncode == 2 and "not a translation run directory" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)  # bf16 autocast is emulated on CPUs without it: 1-3 min on 2 cores, more when loaded
def test_tiny_transformer_learns_under_bf16_autocast(tmp_path, small_pairs):
    from pyasgd.config import TrainConfig
    from pyasgd.trainer.launch import train

    files = user_corpus(tmp_path, small_pairs)
    summary = train(TrainConfig(**files, vocab_size=400, max_len=60, batch_tokens=1200, workers=2, simulate=True,
                                amp="bf16", lr=3e-3, warmup=20, max_updates=80, max_time=0, valid_every=0,
                                quiet=True, out=str(tmp_path / "run")))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        ups = [r for r in map(json.loads, f) if r["kind"] == "update"]
    first, last = (sum(r["loss"] for r in part) / len(part) for part in (ups[:10], ups[-10:]))
    assert last < 0.75 * first, (first, last)
    assert summary["updates"] == 80 and summary["test_bleu"] is not None
