"""`pyasgd-train`: the console entry point."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyasgd-train", description=__doc__)
    parser.add_argument("--build-info", action="store_true", help="print the extension build report and exit")
    args = parser.parse_args(argv)
    from pyasgd.info import report

    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
