"""`pyasgd-study`: the command line of pyasgd.study.grid (run a study's cells) and
pyasgd.study.report (its tables and figures). See pyasgd/study/grid.py for the study file."""
from __future__ import annotations

import argparse
import signal
import sys

from pyasgd.study import grid as study
from pyasgd.errors import ConfigError
from pyasgd.study.report import write_report


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyasgd-study", description=study.__doc__.split("\n\n")[0],
                                epilog="\n\n".join(study.__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a study's cells (finished ones are skipped)")
    r.add_argument("study", help="the study file (TOML)")
    r.add_argument("--out", required=True, help="the study directory: one run directory per cell")
    r.add_argument("--jobs", type=int, default=1, help="cells run in parallel (default 1)")
    r.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    rep = sub.add_parser("report", help="write report.md, report.json and the plots of a study directory")
    rep.add_argument("dir", help="the study directory")
    rep.add_argument("--targets", help="comma list of dev BLEU targets for Table 3 (default: the cells' "
                     "--bleu-targets, else 80, 90 and 95%% of sync's best dev BLEU)")
    args = p.parse_args(argv)
    try:
        if args.command == "run":
            previous = signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: running cells save and stop
            try:
                failed = study.run_study(args.study, args.out, args.jobs)
            finally:
                signal.signal(signal.SIGTERM, previous)
            if not args.no_report:
                print(f"pyasgd-study: report in {write_report(args.out)}")
            return 1 if failed else 0
        try:
            targets = [float(x) for x in args.targets.split(",") if x.strip()] if args.targets else None
        except ValueError:
            raise ConfigError(f"--targets: give a comma list of BLEU scores, got {args.targets!r}") from None
        print(f"pyasgd-study: report in {write_report(args.dir, targets)}")
        return 0
    except ConfigError as e:
        print(f"pyasgd-study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyasgd-study: interrupted; the running cells saved their checkpoints and stopped; "
              "run the same command again to go on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
