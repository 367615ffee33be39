"""The training config in sections: flat and section access, the flat config.json, type checks
(from Python, TOML and the command line), device checks at launch only, pyasgd-train's --help,
and torchrun's environment. No training runs here."""
import ast
import dataclasses
import glob
import json
import os
import pickle
import re

import pytest
import torch

import pyasgd
from pyasgd.config import (FIXED, PER_NODE, SECTIONS, ConfigError, DeviceConfig, MethodConfig, OptimConfig,
                           TrainConfig, field_docs, load_toml, resume_fixed_fields)
from pyasgd.nodes.launch_env import torchrun_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Some value other than the default for each type, to tell the fields apart.
OTHER = {"mode": "async", "task": "synthetic", "schedule": "constant", "sim_order": "normal", "patience_metric": "loss",
         "amp": "bf16", "grad_dtype": "fp32", "preset": "base", "rnn_cell": "lstm", "positions": "learned",
         "stale_policy": "scale", "devices": "cuda:1", "server_device": "cuda:0", "worker_slowdown": "1:2",
         "sim_speeds": "1,2", "bleu_targets": "10,20", "master_addr": "10.0.0.1", "predict": "0.5",
         "log_level": "debug"}


def distinct_settings() -> dict:
    """A valid config's flat settings where (almost) every value differs from its default."""
    out = {}
    for _, f in TrainConfig.flat_fields():
        d = f.default
        if f.name in OTHER:
            out[f.name] = OTHER[f.name]
        elif isinstance(d, bool) or f.name == "prenorm":
            out[f.name] = not d
        elif isinstance(d, str):
            out[f.name] = d + "x" if d else "some/file"
    return {**out, "global_accum": None, "nnodes": 1, "workers": 2, "batch_tokens": 3000, "train_size": 5000,
            "dropout": 0.2, "lr": 0.01, "beta1": 0.8, "seed": 7, "max_updates": 9, "label_smoothing": 0.2}


# --- sections and flat names -----------------------------------------------------------------------

def test_every_setting_lives_in_one_section_and_reads_the_same_flat_or_by_section():
    c = TrainConfig(**distinct_settings())
    names = TrainConfig.field_names()
    assert len(names) == len(set(names)) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    for section, f in TrainConfig.flat_fields():
        assert isinstance(getattr(c, section), SECTIONS[section])
        assert getattr(c, f.name) == getattr(getattr(c, section), f.name), f.name
    assert c.optim.lr == c.lr == 0.01 and c.method.mode == c.mode == "async" and c.data.seed == 7
    assert {"method", "data", "model", "optim", "run", "device", "sim", "nodes"} <= set(SECTIONS)
    assert TrainConfig.lr == 3e-3 and TrainConfig.seed == 1  # on the class: the default (pyasgd/study/grid.py)


def test_sections_may_be_given_whole_and_flat_names_win():
    c = TrainConfig(optim=OptimConfig(lr=1e-3, beta1=0.8), method=MethodConfig(workers=3), beta1=0.7)
    assert (c.lr, c.beta1, c.workers, c.mode) == (1e-3, 0.7, 3, "sync")
    with pytest.raises(TypeError, match="unexpected setting 'learning_rate'"):
        TrainConfig(learning_rate=1e-3)


def test_each_section_checks_its_fields_and_train_config_what_spans_them():
    with pytest.raises(ConfigError, match="^--lr: must be > 0"):
        OptimConfig(lr=0)
    with pytest.raises(ConfigError, match="^--batch-tokens: .*>= --max-len \\+ 1 = 51"):
        TrainConfig(max_len=50, batch_tokens=50)
    with pytest.raises(ConfigError, match="^--max-updates: set at least one"):
        TrainConfig(max_updates=0, max_time=0)
    with pytest.raises(ConfigError, match="^--global-accum: sync mode"):  # method x nodes
        TrainConfig(mode="sync", workers=4, global_accum=2)
    with pytest.raises(ConfigError, match="^--train-size: 100 sequences"):  # data x synthetic x method
        TrainConfig(task="synthetic", workers=4, train_size=100, batch_size=32)
    with pytest.raises(ConfigError, match="^--sim-speeds: give one number per worker"):  # sim x method
        TrainConfig(workers=3, sim_speeds="1,2")
    with pytest.raises(ConfigError, match="^--worker-slowdown: rank 5 is not a worker"):  # device x method
        TrainConfig(workers=3, worker_slowdown="5:2")


def test_derived_settings_and_copies():
    c = TrainConfig(nnodes=2, node_rank=1, master_port=29500, workers=3, mode="sync", stale_policy="drop:4",
                    sim_speeds="1,1,2", worker_slowdown="2:3", bleu_targets="5,6", devices="cpu,cuda:0", threads=2)
    assert (c.total_workers, c.G, c.global_rank(2), c.stale_drop()) == (6, 6, 5, 4)
    assert c.worker_speeds() == [1.0, 1.0, 2.0] and c.slowdowns() == {2: 3.0} and c.targets() == [5.0, 6.0]
    assert c.worker_devices() == ["cpu", "cuda:0", "cpu"] and c.worker_threads() == 2
    d = c.replace(lr=0.5, mode="async", global_accum=2)
    assert (d.lr, d.G, c.lr, c.G) == (0.5, 2, 3e-3, 6) and d.optim is not c.optim
    with pytest.raises(ConfigError, match="^--workers"):
        c.replace(workers=0)  # a copy is checked again
    assert pickle.loads(pickle.dumps(c)) == c  # spawn sends configs to the processes
    assert "optim=OptimConfig(lr=0.003" in repr(c)  # kept in checkpoints


def test_fixed_and_per_node_settings_keep_their_meaning():
    fixed = set(resume_fixed_fields())
    assert fixed == {"workers", "task", "seed", "train_src", "train_tgt", "vocab_size", "max_len", "batch_tokens",
                     "batch_size", "seq_len", "vocab", "train_size", "preset", "rnn_cell", "positions", "prenorm",
                     "nnodes"}
    assert all(f.metadata.get("resume") == FIXED["resume"] for _, f in TrainConfig.flat_fields() if f.name in fixed)
    assert set(PER_NODE) <= set(TrainConfig.field_names())
    # the rendezvous names the first differing setting in this order: the seed before the learning rate
    assert TrainConfig.field_names().index("seed") < TrainConfig.field_names().index("lr")


def test_every_setting_has_a_docstring_and_the_modules_stay_small():
    docs = field_docs()
    assert set(docs) == set(TrainConfig.field_names()) and all(docs.values())
    assert field_docs(OptimConfig)["lr"].startswith("peak learning rate")
    for path in glob.glob(os.path.join(ROOT, "pyasgd", "config", "*.py")):
        with open(path) as f:
            text = f.read()
        assert text.count("\n") <= 450, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= 250, f"{path}: class {node.name}"


# --- the flat config.json ---------------------------------------------------------------------------

def test_to_dict_is_flat_and_round_trips():
    c = TrainConfig(**distinct_settings())
    d = c.to_dict()
    assert list(d) == TrainConfig.field_names()
    assert not any(isinstance(v, (dict, list)) for v in d.values())
    assert TrainConfig.from_dict(d) == c
    assert TrainConfig.from_dict(json.loads(c.to_json())) == c
    assert TrainConfig.from_dict({k.replace("_", "-"): v for k, v in d.items()}) == c  # TOML may use dashes


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "benchmarks", "**", "config.json"),
                                                recursive=True)))
def test_committed_run_directories_load_and_write_the_same_json(path):
    with open(path) as f:
        saved = json.load(f)
    d = TrainConfig.from_dict(saved, source=path).to_dict()
    assert {k: d[k] for k in saved} == saved


def test_a_section_table_in_toml_is_refused_with_a_hint(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("[optim]\nlr = 0.001\n")
    with pytest.raises(ConfigError, match=r"\[optim\]: give the settings by their flat names"):
        TrainConfig.from_toml(str(p))
    with pytest.raises(ConfigError, match="unknown setting 'batchsize'"):
        TrainConfig.from_dict({"batchsize": 3})


# --- types -------------------------------------------------------------------------------------------
WRONG = [
    ("workers", "two", "--workers: expected an integer, got 'two' (a string)"),
    ("lr", "0.001", "--lr: expected a number, got '0.001' (a string)"),
    ("simulate", 1, "--simulate: expected true or false, got 1 (an integer)"),
    ("max_time", [1, 2], "--max-time: expected a number, got [1, 2] (a list)"),
    ("workers", True, "--workers: expected an integer, got True (a boolean)"),
    ("workers", 2.0, "--workers: expected an integer, got 2.0 (a number)"),
    ("devices", {"a": 1}, "--devices: expected a string, got {'a': 1} (a table)"),
    ("global_accum", "4", "--global-accum: expected an integer or null, got '4' (a string)"),
    ("workers", None, "--workers: expected an integer, got null"),
    ("prenorm", "yes", "--prenorm: expected true or false or null, got 'yes' (a string)"),
]


@pytest.mark.parametrize("name, value, message", WRONG)
def test_a_wrong_type_is_one_line_naming_the_option(name, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({name: value})
    assert str(e.value) == message
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("line, message", [
    ('workers = "two"', "--workers: expected an integer, got 'two' (a string)"),
    ('lr = "0.001"', "--lr: expected a number, got '0.001' (a string)"),
    ("simulate = 1", "--simulate: expected true or false, got 1 (an integer)"),
    ("max-updates = [1, 2]", "--max-updates: expected an integer, got [1, 2] (a list)"),
    ("beta1 = 1979-05-27", "--beta1: expected a number, got datetime.date(1979, 5, 27) (a date)"),
    ("seed = true", "--seed: expected an integer, got True (a boolean)"),
])
def test_a_wrong_type_in_toml_is_one_line_naming_the_option(tmp_path, line, message):
    p = tmp_path / "bad.toml"
    p.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(str(p))
    assert str(e.value) == message


def test_numbers_of_the_other_kind_and_null_where_allowed():
    c = TrainConfig.from_dict({"lr": 1, "max_time": 60, "global_accum": None, "dropout": None, "prenorm": None})
    assert c.lr == 1.0 and isinstance(c.lr, float) and isinstance(c.max_time, float)
    assert c.global_accum is None and c.dropout is None and c.prenorm is None


# --- devices: checked at launch, never when a config is made ---------------------------------------

def test_a_gpu_config_loads_on_a_cpu_machine_and_check_devices_refuses_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c = TrainConfig(devices="cuda:0,cuda:1", server_device="cuda:0")
    assert TrainConfig.from_dict(c.to_dict()) == c  # e.g. pyasgd-translate on a laptop
    with pytest.raises(ConfigError, match="^--devices: cuda:0 asked for but CUDA is not available here"):
        c.check_devices()
    with pytest.raises(ConfigError, match="^--server-device: cuda:0 asked for"):
        TrainConfig(server_device="cuda:0").check_devices()
    TrainConfig().check_devices()  # cpu: nothing to ask
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="^--devices: cuda:1 does not exist \\(1 CUDA devices\\)"):
        c.check_devices()
    with pytest.raises(ConfigError, match="^--devices: unknown device 'tpu:0'"):
        DeviceConfig(devices="cpu,tpu:0")  # the syntax is checked at once
    with pytest.raises(ConfigError, match="^--server-device: must be cpu or cuda"):
        TrainConfig(server_device="cuda:x")


def test_the_cli_refuses_a_missing_gpu_before_anything_starts(tmp_path, run_main, monkeypatch):
    from pyasgd.trainer.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run_main(main, "--task", "synthetic", "--devices", "cuda:0", "--quiet", "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.startswith("pyasgd-train: error: --devices: cuda:0")
    assert not (tmp_path / "run").exists()


def test_translate_cli_has_no_device_workaround():
    with open(os.path.join(ROOT, "pyasgd", "tasks", "translate_cli.py")) as f:
        assert 'devices="cpu"' not in f.read()


# --- pyasgd-train, as a user runs it ------------------------------------------------------------------

def test_a_wrongly_typed_config_file_is_one_line_and_exit_2(tmp_path, run_main):
    from pyasgd.trainer.cli import main

    p = tmp_path / "bad.toml"
    p.write_text('task = "synthetic"\nworkers = "two"\n')
    r = run_main(main, "--config", p, "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["pyasgd-train: error: --workers: expected an integer, got 'two' (a string)"]
    assert not (tmp_path / "run").exists()


def test_a_wrongly_typed_study_file_is_one_line_and_exit_2(tmp_path, run_main):
    from pyasgd.study.cli import main

    p = tmp_path / "study.toml"
    p.write_text('[base]\ntask = "synthetic"\nlr = "0.001"\n')
    r = run_main(main, "run", p, "--out", tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "--lr: expected a number, got '0.001' (a string)" in r.stderr and "Traceback" not in r.stderr


def test_a_wrongly_typed_option_names_it(run_main):
    from pyasgd.trainer.cli import main

    r = run_main(main, "--workers", "two")
    assert r.returncode == 2 and "argument --workers: expected an integer, got 'two'" in r.stderr
    r = run_main(main, "--lr", "fast")
    assert r.returncode == 2 and "argument --lr: expected a number, got 'fast'" in r.stderr


def test_help_is_grouped_by_section_with_choices_and_meaningful_defaults(run_main):
    from pyasgd.trainer.cli import build_parser, main

    r = run_main(main, "--help")
    assert r.returncode == 0
    out = r.stdout
    assert "(default: None)" not in out and "(default: )" not in out and "(default: '')" not in out
    for choices in ("{sync,async}", "{translation,synthetic}", "{inverse-sqrt,constant}", "{round-robin,normal}",
                    "{loss,bleu}", "{none,bf16}", "{fp32,bf16}", "{gru,lstm}", "{sinusoidal,learned}",
                    "{tiny,base,rnn-tiny,rnn-base}"):
        assert choices in out, choices
    # each option under its section's title (with its one-line description), the sections in order
    starts = [out.index(f"\n{cls.title}:\n  {cls.__doc__.strip()}\n") for cls in SECTIONS.values()]
    assert starts == sorted(starts)
    ends = starts[1:] + [len(out)]
    for i, section in enumerate(SECTIONS):
        for f in dataclasses.fields(SECTIONS[section]):
            assert re.search(f"\n  --{f.name.replace('_', '-')}[ ,\n]", out[starts[i]:ends[i]]), f.name
    # every setting's help says its default, in words where the default is None or empty
    helps = {a.dest: a.help for a in build_parser()._actions}
    for name in TrainConfig.field_names():
        assert "default:" in helps[name].lower(), name
    assert "(default: the preset's)" in helps["dropout"] and "(default: sync)" in helps["mode"]
    assert "(default: --valid-process)" in helps["valid_process"] and "(default: 0.003)" in helps["lr"]


def test_abbreviations_are_refused(run_main):
    from pyasgd.trainer.cli import build_parser, main

    r = run_main(main, "--max-update", "20")
    assert r.returncode == 2 and "unrecognized arguments: --max-update 20" in r.stderr
    assert build_parser().parse_args(["--max-updates", "20"]).max_updates == 20


def test_version(run_main):
    from pyasgd.trainer.cli import main

    r = run_main(main, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pyasgd-train {pyasgd.__version__}" == "pyasgd-train 0.1.0"


def test_toml_and_options_and_booleans(tmp_path):
    from pyasgd.trainer.cli import build_parser, config_from_args

    p = tmp_path / "run.toml"
    p.write_text('mode = "sync"\nworkers = 3\nmax-updates = 7\nquiet = true\n')
    args = build_parser().parse_args(["--config", str(p), "--max-updates", "9", "--no-quiet", "--simulate"])
    c = config_from_args(args)
    assert (c.mode, c.workers, c.max_updates, c.quiet, c.simulate) == ("sync", 3, 9, False, True)
    assert load_toml(str(p))["max-updates"] == 7
    with pytest.raises(ConfigError, match="^--config: no such file"):
        load_toml(str(tmp_path / "missing.toml"))


# --- torchrun's environment ----------------------------------------------------------------------------

def test_torchrun_environment_gives_the_node_settings():
    env = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511", "LOCAL_WORLD_SIZE": "1"}
    assert torchrun_settings(env) == {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.7", "master_port": 29511}
    assert torchrun_settings({}) == {} and torchrun_settings({"RANK": ""}) == {}
    with pytest.raises(ConfigError, match="--nproc-per-node 1"):
        torchrun_settings({**env, "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match=r"^\$RANK \(torchrun's, for --node-rank\) must be an integer, got 'one'"):
        torchrun_settings({**env, "RANK": "one"})


def test_the_environment_fills_only_what_neither_options_nor_the_config_file_said(tmp_path, monkeypatch):
    from pyasgd.trainer.cli import build_parser, config_from_args

    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(k, v)
    p = tmp_path / "run.toml"
    p.write_text("master-port = 30001\n")
    c = config_from_args(build_parser().parse_args(["--task", "synthetic", "--config", str(p), "--node-rank", "0"]))
    assert (c.nnodes, c.node_rank, c.master_addr, c.master_port) == (2, 0, "10.0.0.7", 30001)


def test_the_cli_module_leaves_nodes_to_the_nodes_package():
    with open(os.path.join(ROOT, "pyasgd", "trainer", "cli.py")) as f:
        assert "nnodes" not in f.read()
