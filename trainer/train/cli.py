"""Command line -> Config -> driver.run. Flags are generated from Config's fields, so each default
lives in one place. `main(argv)` is the `mnist-train` console script and jobs/train_mnist.py."""

from __future__ import annotations

import argparse

from trainer.common import fs
from trainer.common.cli import add_options, fail, options_from, run_command
from trainer.common.errors import UsageError
from trainer.config import Config
from trainer.train import driver

DESCRIPTION = "Train the classic Keras MNIST model with Ray Train workers; evaluate and save it."


def build_parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_options(parser, Config)


def config_from_args(args: argparse.Namespace) -> Config:
    return options_from(Config, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except UsageError as exc:
        return fail(str(exc))
    # An OSError no check named is storage failing under the run: still one line, with the path.
    return run_command(lambda: driver.run(cfg), describe_os_error=fs.describe,
                       interrupted="interrupted; the latest checkpoint is kept: rerun with the same --run-name "
                                   "and --storage-path to resume")


