import argparse
import textwrap
from pathlib import Path

from torchtune_moe._cli.subcommand import Subcommand

from torchtune_moe._packaged_configs import find_config


class Copy(Subcommand):
    """Holds all the logic for the `tune-moe cp` subcommand."""

    def __init__(self, subparsers: argparse._SubParsersAction):
        super().__init__()
        self._parser = subparsers.add_parser(
            "cp",
            prog="tune-moe cp",
            usage="tune-moe cp CONFIG DEST [--force] [--make-parents]",
            help="Copy a packaged config to a local path",
            description="Copy a packaged config to a local path, to edit it and run it with "
            "`tune run moe_full_finetune --config PATH`.",
            epilog=textwrap.dedent(
                """\
            examples:
                $ tune-moe cp tiny/full .
                Copied tiny/full to ./full.yaml

                $ tune-moe cp tiny/full ./my_runs/tiny_long.yaml --make-parents
                Copied tiny/full to my_runs/tiny_long.yaml

            Need to see all packaged configs? Run `tune-moe ls`.
            """
            ),
            formatter_class=argparse.RawTextHelpFormatter,
        )
        self._parser.add_argument(
            "config",
            type=str,
            help="Packaged config to copy, e.g. tiny/full (or tiny/full.yaml). `tune-moe ls` lists them",
        )
        self._parser.add_argument(
            "destination",
            type=str,
            help="File to write, or an existing directory (or one ending in '/') to copy into. "
            "A file name without .yaml/.yml gets .yaml appended",
        )
        self._parser.add_argument(
            "-f", "--force", action="store_true", help="Overwrite the destination if it already exists"
        )
        self._parser.add_argument(
            "--make-parents",
            action="store_true",
            help="Create missing parent directories of the destination instead of failing",
        )
        self._parser.set_defaults(func=self._cp_cmd)

    def _cp_cmd(self, args: argparse.Namespace) -> None:
        """Copy a packaged config to a new location."""
        try:
            src = find_config(args.config)
        except ValueError as e:
            self._parser.error(f"{e}. Run `tune-moe ls` to see them.")

        into_dir = args.destination.endswith(("/", "\\")) or Path(args.destination).is_dir()
        dest = Path(args.destination)
        if into_dir:
            dest = dest / src.name
        elif dest.suffix not in (".yaml", ".yml"):
            dest = dest.with_name(dest.name + ".yaml")

        if dest.is_dir():
            self._parser.error(f"Destination '{dest}' is a directory; give a file name inside it.")
        if dest.exists() and not args.force:
            self._parser.error(f"Destination '{dest}' already exists; pass --force to overwrite it.")
        if not dest.parent.is_dir():
            if not args.make_parents:
                self._parser.error(
                    f"Destination directory '{dest.parent}' does not exist; create it or pass --make-parents."
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
        print(f"Copied {args.config} to {dest}")
