"""`embserve serve`: the server's command, registered with the `embserve` command line as an entry point.

Flags come from the settings table (`flags.SETTINGS`); each one given overrides the same key of the YAML file.
A start that fails prints one line on stderr naming what to fix and exits non-zero (exit code 2 for a wrong
setting or file, 1 for anything else); `--log-level debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import traceback
from collections.abc import Callable

import yaml

from .config import ServerConfig, load_server_config
from .flags import add_flags, overrides_from
from .startup import StartupError, check_startup, one_line

__all__ = ["serve_command"]

EXIT_BAD_SETTING = 2
EXIT_FAILED = 1


def serve_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Run the server: load the model, serve until SIGTERM/SIGINT, then drain."""
    parser.add_argument("--config", help="server YAML file; the flags below override its keys")
    add_flags(parser)
    return _serve


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"embserve serve: {message}", file=sys.stderr)
    return code


def _load_config(args: argparse.Namespace) -> ServerConfig:
    try:
        return load_server_config(args.config).with_overrides(overrides_from(args))
    except FileNotFoundError:
        raise StartupError(f"--config {args.config}: no such file") from None
    except OSError as err:
        raise StartupError(f"--config {args.config}: cannot read it: {err.strerror}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or one_line(err)
        raise StartupError(f"--config {args.config}: not valid YAML{at}: {problem}") from None
    except ValueError as err:
        raise StartupError(f"invalid configuration: {one_line(err)}") from None


def _serve(args: argparse.Namespace) -> int:
    debug = str(getattr(args, "log_level", None) or "").lower() == "debug"
    try:
        config = _load_config(args)
        debug = config.log_level == "debug"
        check_startup(config)
    except StartupError as err:
        return _fail(one_line(err), EXIT_BAD_SETTING, debug)

    from embserve.embeddings import SelfCheckFailed

    from .app import run_on_event_loop, serve_until_signal
    from .connections import raise_fd_limit
    from .logs import configure_logging
    from .workers import run_workers

    configure_logging(config.log_level, config.log_format.value)
    # A fatal signal (SIGBUS when a mapped row file is truncated under the kernel's read) prints every thread's
    # stack on stderr before the process dies, rather than nothing.
    faulthandler.enable()
    raise_fd_limit()  # before any connection is accepted; workers inherit it
    serving = False

    def on_ready() -> None:
        nonlocal serving
        serving = True

    if config.workers > 1:
        try:
            return run_workers(config, config.workers)
        except (StartupError, ValueError) as err:  # the parent's model load: ConfigError, CheckpointError
            return _fail(one_line(err), EXIT_BAD_SETTING, debug)
        except SelfCheckFailed as err:  # the model loaded but cannot compute
            return _fail(one_line(err), EXIT_FAILED, debug)
    try:
        run_on_event_loop(serve_until_signal(config, on_ready=on_ready), config.event_loop)
    except Exception as err:
        if serving:
            raise  # a crash after start-up keeps its traceback
        if isinstance(err, (StartupError, ValueError)):  # ValueError: ConfigError, CheckpointError while building
            return _fail(one_line(err), EXIT_BAD_SETTING, debug)
        if isinstance(err, SelfCheckFailed):  # the model loaded but cannot compute: the message names the table
            return _fail(one_line(err), EXIT_FAILED, debug)
        hint = "" if debug else " (--log-level debug shows the traceback)"
        return _fail(f"failed to start: {type(err).__name__}: {one_line(err)}{hint}", EXIT_FAILED, debug)
    return 0
