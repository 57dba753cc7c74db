"""`embserve route`: the router's command, an entry point of the `embserve` command line like `serve`.

It takes the settings of a server that do not concern a model in memory (listening, limits, connections, TLS,
auth, metrics, drain) and the router's own (`--shard-address K=HOST:PORT`, ...), with `--model` (the whole
model's config) and `--plan`. A start that fails prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .cli import _load_config
from .flags import add_flags
from .startup import StartupError, one_line

__all__ = ["route_command"]


def route_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Route lookups of the whole model to the shard servers of a sharding plan."""
    parser.add_argument("--config", help="server YAML file; the flags below override its keys")
    add_flags(parser, "route")
    return _route


def _route(args: argparse.Namespace) -> int:
    from embserve.embeddings.errors import ConfigError

    from .app import run_on_event_loop
    from .logs import configure_logging
    from .router_app import check_router, route_until_signal

    try:
        config = _load_config(args)
        if config.plan is None:
            raise StartupError("--plan is required: the plan the shards serve")
        check_router(config)
    except (StartupError, ConfigError, ValueError, OSError) as err:
        print(f"embserve route: {one_line(err)}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format.value)
    run_on_event_loop(route_until_signal(config), config.event_loop)
    return 0
