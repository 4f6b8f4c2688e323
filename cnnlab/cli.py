"""What the command-line tools share: the config flags, and turning user errors into one line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from cnnlab.errors import TrainingError, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text stays available through --help)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", action="append", default=[], required=required, metavar="FILE",
                        help="YAML config; give several to layer them, later files win")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override one key, e.g. --set training.epochs=3 (value parsed as YAML); repeatable")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Runs a CLI's main function; a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
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
