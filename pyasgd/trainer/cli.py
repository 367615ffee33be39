"""`pyasgd-train`: train with asynchronous (or synchronous) SGD as the paper compares them.

    pyasgd-train                                   # the default job
    pyasgd-train --mode async --workers 4 --global-accum 1   # plain async (default G = N)
    pyasgd-train --task synthetic --simulate --workers 4 --local-accum 2 --global-accum 2
    pyasgd-train --config run.toml --max-updates 2000
    pyasgd-train --resume runs/20261126-080000-async --max-updates 4000
    pyasgd-train --mode sync --nnodes 2 --node-rank 0 --master-addr HOST0 --master-port 29500   # on HOST0
    pyasgd-train --mode sync --nnodes 2 --node-rank 1 --master-addr HOST0 --master-port 29500   # on HOST1
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr HOST0 --master-port 29500 -m pyasgd.trainer.cli --mode sync

Every option is a TrainConfig field (pyasgd/config.py); --config FILE loads TOML with the same
names, and options given on the command line override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from pyasgd.trainer import rundir
from pyasgd.config import TrainConfig, field_docs, load_toml
from pyasgd.errors import ConfigError, Terminated


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyasgd-train", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (command-line options override it)")
    p.add_argument("--build-info", action="store_true", help="print the extension build report and exit")
    docs = field_docs()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        opt = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (default: {f.default})"
        typ = hints[f.name]
        base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)
        if base is bool:
            p.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        p.add_argument(opt, dest=f.name, type=base, default=None, metavar=f.name.upper(), help=help_)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name) is not None}
    settings: dict = {}
    if given.get("resume"):
        path = os.path.join(given["resume"], rundir.CONFIG)
        if not os.path.isfile(path):
            raise ConfigError(f"--resume: {given['resume']!r} is not a run directory (no {rundir.CONFIG})")
        settings = rundir.read_json(path)
        settings["out"] = given["resume"]
    if args.config:
        settings.update(load_toml(args.config))
    settings.update(given)
    for name, value in torchrun_env(os.environ).items():
        if name not in given and not (args.config and name in settings):  # options and --config win
            settings[name] = value
    return TrainConfig.from_dict(settings, source=args.config or "options")


# torchrun's environment -> the settings it stands for (one pyasgd-train per node: --nproc-per-node 1)
TORCHRUN_ENV = {"WORLD_SIZE": "nnodes", "RANK": "node_rank", "MASTER_ADDR": "master_addr", "MASTER_PORT": "master_port"}


def torchrun_env(environ) -> dict:
    """The multi-node settings torchrun (or any launcher using its names) put in the environment."""
    local = environ.get("LOCAL_WORLD_SIZE")
    if local not in (None, "", "1"):
        raise ConfigError(f"torchrun started {local} processes on this node: run one pyasgd-train per node "
                          "(torchrun --nproc-per-node 1); --workers sets the worker processes of each node")
    out: dict = {}
    for var, name in TORCHRUN_ENV.items():
        value = environ.get(var, "")
        if not value:
            continue
        if name != "master_addr":
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"${var} (torchrun's, for --{name.replace('_', '-')}) must be an integer, "
                                  f"got {value!r}") from None
        out[name] = value
    return out


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
    if not config.quiet and summary.get("test_bleu") is not None:
        print(f"pyasgd-train: dev BLEU {summary['best_valid_bleu']:.2f} (best), test BLEU "
              f"{summary['test_bleu']:.2f}, {summary['wps']:,.0f} words/s; run directory {summary['run_dir']}",
              file=sys.stderr)
    print(json.dumps({k: summary.get(k) for k in keys if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
