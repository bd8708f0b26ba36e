"""Entry point of ``tune-moe`` (declared in pyproject.toml), laid out like torchtune's ``tune`` CLI."""

import argparse
import os
import sys
from typing import Optional, Sequence

from torchtune_moe._cli.cp import Copy
from torchtune_moe._cli.ls import List
from torchtune_moe._cli.plot import Plot


class TuneMoECLIParser:
    """Holds all information related to running the CLI."""

    def __init__(self):
        self._parser = argparse.ArgumentParser(
            prog="tune-moe",
            description="torchtune-moe CLI: list and copy the packaged configs, plot a run's logs. "
            "Train with `tune run moe_full_finetune --config tiny/full`.",
            add_help=True,
        )
        # Default command is to print help
        self._parser.set_defaults(func=lambda args: self._parser.print_help())
        subparsers = self._parser.add_subparsers(title="subcommands")
        List.create(subparsers)
        Copy.create(subparsers)
        Plot.create(subparsers)

    def parse_args(self, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
        """Parse CLI arguments (``sys.argv[1:]`` when ``argv`` is None)."""
        return self._parser.parse_args(argv)

    def run(self, args: argparse.Namespace) -> None:
        """Execute CLI"""
        args.func(args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = TuneMoECLIParser()
    args = parser.parse_args(argv)
    try:
        parser.run(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
