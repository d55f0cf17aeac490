"""The `rollouts` command.

rollouts plot RUN_DIR [--out PNG]     # metrics.jsonl of a run -> a PNG of its curves
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rollouts` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="rollouts", description="rollouts command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="draw a run's metrics (loss, lr, grad norm, ...)")
    plot.add_argument("run", type=Path, help="a run directory holding metrics.jsonl, or the file")
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default: beside it)")
    args = parser.parse_args(argv)
    if args.command == "plot":
        from rollouts.monitoring.logging import plot_metrics

        print(plot_metrics(args.run, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
