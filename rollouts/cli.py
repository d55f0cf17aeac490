"""The `rollouts` command.

rollouts plot RUN_DIR [RUN_DIR ...] [--out PNG]   # a run's metrics.jsonl -> a PNG of its
                                                  # curves; several runs are overlaid
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rollouts` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="rollouts", description="rollouts command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="draw runs' metrics (loss, lr, grad norm, ...)")
    plot.add_argument(
        "runs", type=Path, nargs="+", help="run directories holding metrics.jsonl, or the files"
    )
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the first)")
    args = parser.parse_args(argv)
    if args.command == "plot":
        from rollouts.monitoring.logging import plot_metrics

        print(plot_metrics(args.runs if len(args.runs) > 1 else args.runs[0], args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
