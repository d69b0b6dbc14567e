"""What every entry script shares: logging set-up and turning bad input into one clear line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.DEBUG if debug else logging.INFO)


def run_main(main: Callable, args) -> None:
    """Runs `main(args)`; a `UserError` becomes one `error: ...` line on stderr and exit code 2.

    With `--debug` the full traceback is shown instead.
    """
    from flux_qlora.data import UserError

    try:
        main(args)
    except UserError as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
