"""`pyasgd-train`: train with asynchronous (or synchronous) SGD as the paper compares them.

    pyasgd-train                                   # the default job
    pyasgd-train --mode async --workers 4 --global-accum 1   # plain async (default G = N)
    pyasgd-train --task synthetic --simulate --mode async --workers 4 --local-accum 2 --global-accum 2
    pyasgd-train --config run.toml --max-updates 2000
    pyasgd-train --resume runs/20261126-080000-sync --max-updates 4000

Every option is a setting of TrainConfig (pyasgd/config/), listed above by its section;
--config FILE loads TOML with the same names (max_updates = 2000), and options given on the
command line override it. Several machines: see "Beyond one node" in the README (under torchrun,
its environment fills the node options).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pyasgd.config import SECTIONS, TrainConfig, field_docs, load_toml
from pyasgd.config.base import EXPECTED, choices_of, field_types, opt
from pyasgd.errors import ConfigError, Terminated
from pyasgd.nodes.launch_env import torchrun_settings
from pyasgd.trainer import rundir


METAVARS = {int: "N", float: "X"}


def _number(base: type):
    """argparse's type for an int or float setting, its error in the config's words."""
    def convert(text: str):
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {EXPECTED[base]}, got {text!r}") from None
    return convert


def _help(name: str, doc: str, default, base: type) -> str:
    """The field's docstring, and its default unless the docstring says what the default means."""
    if "default:" not in doc.lower():
        if default is None or default == "":
            raise AssertionError(f"the docstring of setting {name} must say what its default ({default!r}) means")
        if base is bool:
            shown = opt(name) if default else "--no-" + opt(name)[2:]
        else:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
        doc = f"{doc} (default: {shown})"
    return doc.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    import pyasgd

    description, epilog = __doc__.rsplit("\n\n", 1)
    p = argparse.ArgumentParser(prog="pyasgd-train", usage="%(prog)s [OPTIONS]", description=description, epilog=epilog,
                                allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {pyasgd.__version__}")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of settings, by the options' names (command-line options override it)")
    p.add_argument("--build-info", action="store_true", help="print the extension build report and exit")
    docs = field_docs()
    groups = {s: p.add_argument_group(cls.title, cls.__doc__.strip().splitlines()[0]) for s, cls in SECTIONS.items()}
    for section, f in TrainConfig.flat_fields():
        base, _ = field_types(SECTIONS[section])[f.name]
        g, help_ = groups[section], _help(f.name, docs[f.name], f.default, base)
        if base is bool:
            g.add_argument(opt(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        kw: dict = {"metavar": f.name.upper()} if base is str else {"type": _number(base), "metavar": METAVARS[base]}
        choices = choices_of(f)
        if choices:  # shown as {a,b}; "" (the default's meaning, said in the help) is accepted but not shown
            kw = {"choices": choices, "metavar": "{" + ",".join(c for c in choices if c) + "}"}
        g.add_argument(opt(f.name), dest=f.name, default=None, help=help_, **kw)
    groups["nodes"].add_argument(
        "--rdzv-token", metavar="TOKEN", default=None,
        help="across nodes: a secret every node must prove it knows to join (HMAC at the rendezvous); without it "
             "the settings are not readable in node 0's store. Prefer the environment variable PYASGD_RDZV_TOKEN "
             "(an option shows in ps). It does not protect the gloo traffic: keep nodes on a private network. "
             "Not saved: give it again on --resume.")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run directory's config (--resume), then --config, then the options, then what a
    launcher's environment implies where neither --config nor an option said it."""
    given = {name: getattr(args, name) for name in TrainConfig.field_names() if getattr(args, name) is not None}
    settings: dict = {}
    if given.get("resume"):
        settings = rundir.saved_settings(given["resume"])  # checked: JSON, an object, valid settings
        settings["out"] = given["resume"]
    toml = {k.replace("-", "_"): v for k, v in load_toml(args.config).items()} if args.config else {}
    settings.update(toml)
    settings.update(given)
    for name, value in torchrun_settings(os.environ).items():
        if name not in given and name not in toml:  # options and --config win
            settings[name] = value
    return TrainConfig.from_dict(settings, source=args.config or "options")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.build_info:
        from pyasgd.info import report

        print(report())
        return 0
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"pyasgd-train: error: {e}", file=sys.stderr)
        return 2

    if args.rdzv_token is not None:
        from pyasgd.nodes import auth

        os.environ[auth.ENV] = args.rdzv_token  # the launcher and its server read it there
    from pyasgd.trainer.launch import TrainingError, train
    from pyasgd.trainer.proc import set_name, stop_resource_tracker

    # As a program (the console script or `python -m pyasgd.trainer.cli`), not when main() is called in a
    # process that is someone else's (tests, notebooks).
    as_program = __name__ == "__main__" or os.path.basename(sys.argv[0]) == "pyasgd-train"
    if as_program:
        set_name("pyasgd-train")
    try:
        summary = train(config)
    except ConfigError as e:
        print(f"pyasgd-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"pyasgd-train: training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyasgd-train: interrupted; all processes stopped, shared memory removed", file=sys.stderr)
        return 130
    except Terminated:
        print("pyasgd-train: terminated; all processes stopped, shared memory removed", file=sys.stderr)
        return 143
    finally:
        if as_program:
            stop_resource_tracker()  # the launcher's last child: nothing outlives pyasgd-train
    keys = ("mode", "workers", "global_accum", "local_accum", "pull_every", "updates", "wps",
            "avg_staleness", "best_valid", "primary_metric", "best_valid_bleu", "test_bleu", "test_chrf",
            "stopped_because", "wall_s")
    print(json.dumps({k: summary.get(k) for k in keys if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
