import argparse
import textwrap
from pathlib import Path

from torchtune_moe._cli.subcommand import Subcommand

from torchtune_moe._cli._plots import plot_run


class Plot(Subcommand):
    """Holds all the logic for the `tune-moe plot` subcommand."""

    def __init__(self, subparsers: argparse._SubParsersAction):
        super().__init__()
        self._parser = subparsers.add_parser(
            "plot",
            prog="tune-moe plot",
            usage="tune-moe plot OUTPUT_DIR [--out DIR]",
            help="Draw a run's disk logs as PNG figures (loss curves, expert-load heatmaps)",
            description=textwrap.dedent(
                """\
            Draw the disk logs of a `tune run moe_full_finetune` run as PNG figures:
              losses.png                  total loss, cross-entropy, each aux loss, lr
              metrics.png                 other logged scalars (tokens/s, memory, ...)
              expert_load_summary.png     all layers: load / ideal per expert at the last step,
                                          imbalance and dead experts per layer over steps
              expert_load_over_steps*.png one heatmap per layer: experts x steps, load / ideal
            Reads OUTPUT_DIR/logs/*.txt (torchtune DiskLogger) and OUTPUT_DIR/expert_load.jsonl.
            Needs matplotlib: pip install 'torchtune-moe[plot]'."""
            ),
            epilog=textwrap.dedent(
                """\
            examples:
                $ tune run moe_full_finetune --config tiny/full output_dir=/tmp/tiny
                $ tune-moe plot /tmp/tiny
                /tmp/tiny/plots/losses.png
                /tmp/tiny/plots/metrics.png
                /tmp/tiny/plots/expert_load_summary.png
                /tmp/tiny/plots/expert_load_over_steps.png
            """
            ),
            formatter_class=argparse.RawTextHelpFormatter,
        )
        self._parser.add_argument("output_dir", type=Path, help="The run's output_dir")
        self._parser.add_argument(
            "--out", type=Path, default=None, metavar="DIR", help="Directory to write the PNGs to (default: OUTPUT_DIR/plots)"
        )
        self._parser.set_defaults(func=self._plot_cmd)

    def _plot_cmd(self, args: argparse.Namespace) -> None:
        """Draw the figures and print their paths."""
        try:
            paths = plot_run(args.output_dir, args.out)
        except (FileNotFoundError, ValueError, ModuleNotFoundError) as e:
            self._parser.error(str(e))
        for path in paths:
            print(path)
