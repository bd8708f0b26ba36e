import argparse
import textwrap

from torchtune_moe._cli.subcommand import Subcommand

from torchtune_moe._packaged_configs import packaged_configs, recipe_of


class List(Subcommand):
    """Holds all the logic for the `tune-moe ls` subcommand."""

    def __init__(self, subparsers: argparse._SubParsersAction):
        super().__init__()
        self._parser = subparsers.add_parser(
            "ls",
            prog="tune-moe ls",
            help="List the packaged configs and the recipe they belong to",
            description="List the packaged configs and the recipe they belong to",
            epilog=textwrap.dedent(
                """\
            examples:
                $ tune-moe ls
                RECIPE                                   CONFIG
                moe_full_finetune                        tiny/full
                                                         ...

            To run one of them:
                $ tune run moe_full_finetune --config tiny/full
            To copy one and edit it:
                $ tune-moe cp tiny/full my_config.yaml
            """
            ),
            formatter_class=argparse.RawTextHelpFormatter,
        )
        self._parser.set_defaults(func=self._ls_cmd)

    def _ls_cmd(self, args: argparse.Namespace) -> None:
        """List all packaged configs."""
        print(f"{'RECIPE':<40} CONFIG")
        names = sorted(packaged_configs(), key=lambda n: (recipe_of(n), n))
        for i, name in enumerate(names):
            # Like `tune ls`: the recipe name only on its first config's row
            first = i == 0 or recipe_of(names[i - 1]) != recipe_of(name)
            print(f"{recipe_of(name) if first else '':<40} {name}")
