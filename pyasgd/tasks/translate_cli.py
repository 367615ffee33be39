"""`pyasgd-translate`: translate text with a trained run.

    pyasgd-translate --checkpoint runs/20261126-081500-async < input.en > output.de
    pyasgd-translate --checkpoint DIR --input input.en --beam 5
    pyasgd-translate --checkpoint runs/20261126-081500-async/checkpoint.pt < input.en

Reads the run's config.json, its subword model (spm.model) and its best validated parameters
(best.pt; --last takes the last checkpoint instead). Given a checkpoint file (best.pt or
checkpoint.pt), it decodes with that file's parameters, and reads config.json and spm.model
from the directory the file is in.
"""
# The command line only: decoding itself is pyasgd.tasks.translation.translate().
from __future__ import annotations

import argparse
import os
import sys

import torch


def load_translator(run_dir: str, last: bool = False):
    """The run's config, subword model and model, from a run directory (its best.pt, or its
    checkpoint.pt with `last`) or a checkpoint file in one. A file that is not a checkpoint
    pyasgd wrote for this model raises CheckpointError (a ValueError), one line."""
    from pyasgd.core import checkpoint
    from pyasgd.errors import CheckpointError
    from pyasgd.trainer import rundir
    from pyasgd.config import TrainConfig
    from pyasgd.data.subword import Subwords
    from pyasgd.core.flat import FlatModel
    from pyasgd.models import build, model_config_from
    from pyasgd.tasks.translation import SUBWORD_MODEL

    ckpt = ""
    if os.path.isfile(run_dir):  # a checkpoint file: the run's other files are beside it
        if last:
            raise ValueError("--last takes a run directory; with a checkpoint file, that file is used")
        ckpt, run_dir = run_dir, os.path.dirname(run_dir) or "."
    elif not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory or checkpoint file")
    for name in (rundir.CONFIG, SUBWORD_MODEL):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"{run_dir} is not a translation run directory (no {name})")
    path = os.path.join(run_dir, rundir.CONFIG)  # a GPU run's config loads anywhere: only a launch checks devices
    config = TrainConfig.from_dict(rundir.saved_settings(run_dir, context=""), source=path)
    subwords = Subwords(os.path.join(run_dir, SUBWORD_MODEL))
    flat = FlatModel(build(model_config_from(config), subwords.vocab_size))
    if not ckpt:
        best = os.path.join(run_dir, rundir.BEST)
        ckpt = os.path.join(run_dir, rundir.CHECKPOINT) if last or not os.path.exists(best) else best
        if not os.path.exists(ckpt):
            raise FileNotFoundError(f"{run_dir} has no {rundir.BEST} or {rundir.CHECKPOINT} to translate with")
    params = checkpoint.params_of(checkpoint.load_checked(ckpt, "any"))
    if params.numel() != flat.n:
        raise CheckpointError(f"{ckpt} holds {params.numel():,} parameters but the model of {path} has "
                              f"{flat.n:,}: it is not this run's checkpoint")
    flat.params.copy_(params)
    return config, subwords, flat.model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyasgd-translate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR|FILE",
                   help="a run directory of pyasgd-train, or a checkpoint file in one (best.pt or checkpoint.pt: "
                        "config.json and spm.model are read from the file's directory)")
    p.add_argument("--input", help="a file of sentences, one per line (default: standard input)")
    p.add_argument("--beam", type=int, help="beam size (default: the run's --beam)")
    p.add_argument("--last", action="store_true",
                   help="use the run directory's last checkpoint (checkpoint.pt), not the best validated one (best.pt)")
    args = p.parse_args(argv)
    from pyasgd.tasks.translation import translate

    try:
        config, subwords, model = load_translator(args.checkpoint, args.last)
        if args.input:
            from pyasgd.data.corpus import read_lines

            lines = read_lines(args.input)
        else:
            lines = sys.stdin.read().splitlines()
    except (OSError, ValueError) as e:
        print(f"pyasgd-translate: error: {e}", file=sys.stderr)
        return 2
    beam = args.beam or config.beam
    if beam < 1:
        print("pyasgd-translate: error: --beam must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    keep = [i for i, line in enumerate(lines) if line.strip()]
    hyps = translate(model, subwords, [lines[i].strip() for i in keep], beam, config.length_penalty)
    out = [""] * len(lines)  # empty input lines stay empty: output stays line-parallel
    for i, h in zip(keep, hyps):
        out[i] = h
    sys.stdout.write("".join(line + "\n" for line in out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
