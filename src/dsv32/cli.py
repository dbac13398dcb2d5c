"""The `dsv32` command line.

Every subcommand lives in the module that owns its job; this file only wires them into argparse
and turns expected failures (`CLIError`, bad files, bad configs) into one line on stderr and exit 1.
"""
from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """An error the user can fix; printed as one line, no traceback."""


def _add_model_commands(sub) -> None:
    from dsv32 import cli_model

    cli_model.add_commands(sub)


def _add_tokenizer_and_data_commands(sub) -> None:
    # owned by the tokenizer/data work (issue 3); each module registers its own subcommands
    from dsv32.data import cli as data_cli

    data_cli.add_commands(sub)


def _add_training_commands(sub) -> None:
    from dsv32.train import cli as train_cli

    train_cli.add_commands(sub)


def _add_inference_commands(sub) -> None:
    # owned by the inference work (issue 5): generate, chat
    from dsv32.infer import cli as infer_cli

    infer_cli.add_commands(sub)


def _add_serving_commands(sub) -> None:
    # owned by the serving work (issue 6): serve
    from dsv32.serve import cli as serve_cli

    serve_cli.add_commands(sub)


def _add_reasoning_commands(sub) -> None:
    # owned by the RL work (issue 7): ttc (test-time compute scaling)
    from dsv32.train import grpo_cli

    grpo_cli.add_ttc_command(sub)


def _add_pipeline_commands(sub) -> None:
    # the one-command pipeline and its system card (issue 8): speedrun, card
    from dsv32 import speedrun
    from dsv32.eval import card

    speedrun.add_commands(sub)
    card.add_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv32", description="DeepSeek-V3.2 from scratch: model, training, inference, serving")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_commands(sub)
    _add_tokenizer_and_data_commands(sub)
    _add_training_commands(sub)
    _add_inference_commands(sub)
    _add_reasoning_commands(sub)
    _add_serving_commands(sub)
    __import__("dsv32.eval.cli", fromlist=["add_commands"]).add_commands(sub)  # dsv32 eval (issue 8)
    _add_pipeline_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"dsv32 {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # run through the imported module, so that `python -m dsv32.cli` and the subcommand modules share
    # one CLIError class (under -m this file is also `__main__`, a second copy of the module)
    from dsv32.cli import main as _main

    sys.exit(_main())
