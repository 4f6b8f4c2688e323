"""What the command-line tools share: the config flags, a quiet TensorFlow start, and turning user errors into one
line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from cnnlab import console
from cnnlab.errors import TrainingError, UserError

# Flag spellings people bring from other trainers, and the config key they mean.
_FLAG_ALIASES = {"lr": "learning_rate", "bs": "batch_size", "img_size": "image_size"}


def config_key_hint(unrecognized: list[str]) -> str:
    """For unrecognized flags that look like config keys (`--epochs 3`), the `--set` form of each; else ''."""
    from cnnlab.config import leaf_keys

    leaves = leaf_keys()
    hints = []
    for i, token in enumerate(unrecognized):
        if not token.startswith("--"):
            continue
        flag, _, value = token[2:].partition("=")
        name = _FLAG_ALIASES.get(flag.replace("-", "_"), flag.replace("-", "_"))
        keys = leaves.get(name, [])
        if not keys:
            continue
        if not value:
            value = unrecognized[i + 1] if i + 1 < len(unrecognized) and not unrecognized[i + 1].startswith(
                "--") else "VALUE"
        hints.append(" or ".join(f"--set {key}={value}" for key in keys))
    return f"; config keys are set with --set: {', '.join(hints)}" if hints else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text stays available through --help), a flag that is
    really a config key gets the `--set` form as a hint, and every tool takes --verbose."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true",
                          help=f"also show TensorFlow's own start-up log lines (or set {console.VERBOSE_ENV}=1)")

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message += config_key_hint(message[len(prefix):].split())
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", action="append", default=[], required=required, metavar="FILE",
                        help="YAML config; give several to layer them, later files win")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override one key, e.g. --set training.epochs=3 (value parsed as YAML); repeatable")


def add_images_and_model_arguments(parser: argparse.ArgumentParser, exported: bool = False,
                                   several_runs: bool = False) -> None:
    """IMAGE_OR_FOLDER and which model reads it (--run or --checkpoint; with `exported` also --model; with
    `several_runs`, --run may be repeated): what predict.py and gradcam.py take."""
    parser.add_argument("target", metavar="IMAGE_OR_FOLDER", help="an image file, or a folder searched recursively")
    source = parser.add_mutually_exclusive_group(required=True)
    if several_runs:
        source.add_argument("--run", action="append", metavar="RUN_DIR",
                            help="a run directory (its best checkpoint); repeat to compare runs side by side")
    else:
        source.add_argument("--run", metavar="RUN_DIR", help="a run directory (its best checkpoint)")
    source.add_argument("--checkpoint", metavar="FILE", help="a .keras checkpoint")
    if exported:
        source.add_argument("--model", metavar="EXPORT", help="an exported model's folder (export.py), or its file")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Runs a CLI's main function; a UserError becomes `error: <message>` on stderr and exit status 2.

    TensorFlow is started first, with its native start-up lines held back unless --verbose (--help needs no
    TensorFlow and skips that).
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        if not {"-h", "--help"} & set(args):
            console.start_tensorflow(verbose=console.verbose_requested(args))
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
