"""`embserve serve`: the server's command, registered with the `embserve` command line as an entry point.

Flags come from the settings table (`flags.SETTINGS`); each one given overrides the same key of the YAML file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .config import load_server_config
from .flags import add_flags, overrides_from

__all__ = ["serve_command"]


def serve_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Run the server: load the model, serve until SIGTERM/SIGINT, then drain."""
    parser.add_argument("--config", help="server YAML file; the flags below override its keys")
    add_flags(parser)
    return _serve


def _serve(args: argparse.Namespace) -> int:
    from embserve.embeddings import SelfCheckFailed

    from .app import run_server
    from .connections import raise_fd_limit
    from .logs import configure_logging
    from .workers import run_workers

    try:
        config = load_server_config(args.config).with_overrides(overrides_from(args))
    except ValueError as err:
        print(f"embserve serve: invalid configuration: {err}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format.value)
    raise_fd_limit()  # before any connection is accepted; workers inherit it
    try:
        if config.workers > 1:
            return run_workers(config, config.workers)
        run_server(config)
    except SelfCheckFailed as err:
        print(f"embserve serve: {err}", file=sys.stderr)
        return 1
    return 0
