"""Property tests (hypothesis) of what a user hands pyasgd: a config file, settings of any type, a
corpus, a study file. Random bytes, random types and random sizes give either success or the
project's one-line user error (ConfigError and its subclasses: CorpusError, StudyError, ...),
never a traceback of something else."""
from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyasgd.config import TrainConfig
from pyasgd.errors import ConfigError

FIELDS = sorted(TrainConfig.field_names())
SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

# TOML values of every kind, and strings that look like the ones settings take
scalars = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.text(max_size=20),
                    st.sampled_from(["sync", "async", "auto", "dc:1", "drop:x", "cuda:0", "cpu", "1,2", "0", "-1",
                                     "inf", "nan", ""]))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.none(), st.dictionaries(st.text(max_size=5), scalars,
                                                                                      max_size=2))
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else ("-inf" if v == float("-inf") else repr(v)))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + "}"
    if v is None:
        return '""'
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


toml_text = st.lists(st.tuples(keys, values), max_size=8).map(
    lambda kv: "".join(f"{k if k.isidentifier() else repr(k)} = {toml_value(v)}\n" for k, v in kv))
files = st.one_of(st.binary(max_size=400), toml_text, st.text(max_size=300))


def one_line(e: BaseException) -> None:
    assert isinstance(e, ConfigError), repr(e)
    assert str(e) and "\n" not in str(e), repr(str(e))


def written(data: bytes | str, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


@SETTINGS
@given(files)
def test_any_config_file_loads_or_gives_one_line(data):
    path = written(data, ".toml")
    try:
        TrainConfig.from_toml(path)
    except ConfigError as e:
        one_line(e)
    finally:
        os.unlink(path)


@SETTINGS
@given(st.dictionaries(keys, values, max_size=6))
def test_any_settings_of_any_type_load_or_give_one_line(settings_):
    try:
        c = TrainConfig.from_dict(settings_)
    except ConfigError as e:
        one_line(e)
        return
    assert TrainConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()  # what loads, round-trips


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)), st.one_of(st.binary(max_size=300),
                                                                           st.text(max_size=300)))
def test_any_corpus_reads_or_gives_one_line(src, tgt):
    from pyasgd.data import corpus

    paths = [written(src, ".src"), written(tgt, ".tgt")]
    try:
        c = TrainConfig(task="translation", train_src=paths[0], train_tgt=paths[1], dev_src=paths[0],
                        dev_tgt=paths[1], max_updates=1)
        got = corpus.load(c)
        assert got.train and all(s.strip() == s and t.strip() == t and s and t for s, t in got.train)
    except ConfigError as e:
        one_line(e)
    finally:
        for p in paths:
            os.unlink(p)


@pytest.mark.slow
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40)), min_size=1,
                max_size=40))
def test_any_text_makes_a_translation_task_or_gives_one_line(pairs):
    """The subword model is trained on whatever text there is (sentencepiece): success, or the
    corpus error that says what to change."""
    from pyasgd.tasks import make_task

    src = written("".join(s.replace("\n", " ").replace("\r", " ") + "\n" for s, _ in pairs), ".src")
    tgt = written("".join(t.replace("\n", " ").replace("\r", " ") + "\n" for _, t in pairs), ".tgt")
    cache = tempfile.mkdtemp()
    old = os.environ.get("PYASGD_CACHE")
    os.environ["PYASGD_CACHE"] = cache
    try:
        c = TrainConfig(task="translation", train_src=src, train_tgt=tgt, dev_src=src, dev_tgt=tgt, vocab_size=40,
                        max_updates=1)
        make_task(c)
    except ConfigError as e:
        one_line(e)
    finally:
        if old is None:
            os.environ.pop("PYASGD_CACHE", None)
        else:
            os.environ["PYASGD_CACHE"] = old
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        os.unlink(src)
        os.unlink(tgt)


study_keys = st.sampled_from(["[base]", "[grid]", "[[grids]]", "[methods.m]", "[pairs.p]", "[study]"])
study_text = st.lists(st.tuples(study_keys, st.lists(st.tuples(st.one_of(st.sampled_from(
    ["method", "lr", "seed", "pair", "task", "max_updates", "mode", "train_src", "description"] + FIELDS[:10]),
    st.text(max_size=8)), values), max_size=4)), max_size=4).map(
    lambda secs: "".join(f"{h}\n" + "".join(f"{k if k.isidentifier() else repr(k)} = {toml_value(v)}\n"
                                            for k, v in body) for h, body in secs))


@SETTINGS
@given(st.one_of(st.binary(max_size=400), study_text))
def test_any_study_file_expands_or_gives_one_line(data):
    from pyasgd.study.grid import load_study

    path = written(data, ".toml")
    try:
        load_study(path)
    except ConfigError as e:
        one_line(e)
    finally:
        os.unlink(path)
