"""Command line -> Config -> driver.run. Flags are generated from Config's fields, so each default
lives in one place. `main(argv)` is the `mnist-train` console script and jobs/train_mnist.py."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from trainer.config import FIELD_TYPES, Config

DESCRIPTION = "Train the classic Keras MNIST model with Ray Train workers; evaluate and save it."


def build_parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if "(default" in help_text:
            help_text += "%(default).0s"  # says its own default; stops argparse adding "(default: None)"
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=FIELD_TYPES[f.type][0], default=f.default, help=help_text,
                                choices=f.metadata.get("choices"), metavar=f.name.upper())
    return parser


class _ScriptHelp(argparse.RawDescriptionHelpFormatter):
    """The docstring as written; a flag's default after its help, unless the help already says it
    or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def script_parser(doc: str) -> argparse.ArgumentParser:
    """The parser every script in scripts/ starts from: its docstring as --help's description, as
    written, and each flag's default shown."""
    return argparse.ArgumentParser(description=doc.strip(), formatter_class=_ScriptHelp)


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        return fail(str(exc))
    from trainer.checkpoint import CheckpointError
    from trainer.cluster import ClusterError
    from trainer.data import DataError
    from trainer.driver import TrainingError, run
    from trainer.storage import StorageError, describe
    from trainer.store import StoreError

    try:
        run(cfg)
    except (DataError, ClusterError, CheckpointError, TrainingError, StoreError, StorageError, ValueError) as exc:
        return fail(str(exc), code=1)
    except OSError as exc:  # storage the checks above did not name: still one line, with the path
        return fail(describe(exc), code=1)
    except KeyboardInterrupt:
        return fail("interrupted; the latest checkpoint is kept: rerun with the same --run-name "
                    "and --storage-path to resume", code=130)
    return 0


