"""The `rollouts` command.

rollouts train CONFIG.py [--section.field value ...]   # a run as a config file says
rollouts sft --model DIR --train FILE [--val FILE]      # fine-tune on your data, no config file
rollouts lr-find CONFIG.py [--steps N] [overrides]     # sweep the learning rate, suggest one
rollouts tune CONFIG.py --trials N --storage sqlite:///study.db   # search hyperparameters
rollouts tune CONFIG.py --ray --trials N --storage DIR   # the same on Ray Tune, with ASHA
rollouts serve --model DIR [--port N] [--api-key tml-...]   # the Tinker API on a local model
rollouts plot RUN_DIR [RUN_DIR ...] [--out PNG]   # a run's metrics.jsonl -> a PNG of its
                                                  # curves; several runs are overlaid
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rollouts` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="rollouts", description="rollouts command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_config_command(
        commands, "train", "run a config file (SFT, then RL if enabled)", "--section.field value"
    )
    from rollouts.recipes.quick import add_sft_arguments

    add_sft_arguments(commands.add_parser("sft", help="fine-tune a local model on chat data"))
    _add_config_command(
        commands, "lr-find", "sweep the learning rate on a config's model and data; suggest one",
        "--steps N --min-lr X --max-lr Y, and --section.field value",
    )  # fmt: skip
    _add_config_command(
        commands, "tune", "search hyperparameters of a config's SFT or RL (optuna; ray tune)",
        "--trials N --storage sqlite:///study.db [--study NAME] [--ray --storage DIR "
        "--ray-address A --cpus-per-trial C --gpus-per-trial G --max-concurrent M "
        "--grace-evals E --reduction-factor R --max-failures F], and --section.field value",
    )  # fmt: skip
    from rollouts.serve.app import add_serve_arguments

    add_serve_arguments(commands.add_parser("serve", help="serve the Tinker API on a local model"))
    plot = commands.add_parser("plot", help="draw runs' metrics (loss, lr, grad norm, ...)")
    plot.add_argument(
        "runs", type=Path, nargs="+", help="run directories holding metrics.jsonl, or the files"
    )
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the first)")
    args = parser.parse_args(argv)
    if args.command in ("train", "sft"):
        return _train(args)
    if args.command in ("lr-find", "tune"):
        import logging

        from rollouts.recipes.train import report_user_errors

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        if args.command == "lr-find":
            from rollouts.recipes.lr_find import lr_find_command as command
        else:
            from rollouts.recipes.tune import tune_command as command
        return report_user_errors(
            lambda: command(args.config, args.overrides), f"rollouts {args.command}"
        )
    if args.command == "serve":
        from rollouts.recipes.train import report_user_errors
        from rollouts.serve.app import serve_command

        return report_user_errors(lambda: serve_command(args), "rollouts serve")
    if args.command == "plot":
        from rollouts.monitoring.logging import plot_metrics

        print(plot_metrics(args.runs if len(args.runs) > 1 else args.runs[0], args.out))
    return 0


def _add_config_command(commands: Any, name: str, help_text: str, flags: str) -> None:
    """A subcommand taking a config file, then its own flags and the config's overrides."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument("config", help="a Python file that builds `config = TrainConfig(...)`")
    command.add_argument("overrides", nargs=argparse.REMAINDER, help=f"{flags} ...")


def _train(args: argparse.Namespace) -> int:
    import logging

    from rollouts.recipes.quick import quick_sft_config
    from rollouts.recipes.train import load_config, report_user_errors, run_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "train":
        return report_user_errors(
            lambda: run_config(load_config(args.config, args.overrides)), "rollouts train"
        )
    return report_user_errors(lambda: run_config(quick_sft_config(args)), "rollouts sft")


if __name__ == "__main__":
    raise SystemExit(main())
