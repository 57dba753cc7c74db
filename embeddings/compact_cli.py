"""`embserve compact`: fold a base checkpoint's delta log into a new base (see `compact`).

    embserve compact --model model.yaml --checkpoint ranker.safetensors --output ranker-2.safetensors
    embserve compact --model model.yaml --checkpoint rows/ --updates-dir /var/embserve/updates --output rows-2/

Prints the new version; serve it (`SIGHUP` after pointing `--checkpoint` at it, or a rolling restart), and the
updates answered since the compaction are carried over from the old log when it loads. Failures are one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .compact import compact
from .config import ConfigError, load_model_config
from .delta_log import default_log_dir
from .errors import CheckpointError

__all__ = ["compact_command", "run_compact"]


def compact_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Fold a checkpoint's delta log of row updates into a new checkpoint."""
    parser.add_argument("--model", required=True, help="model config: a YAML path or a built-in name")
    parser.add_argument("--checkpoint", required=True, help="the base: a checkpoint file or a row directory")
    parser.add_argument(
        "--updates-dir", help="where the base's delta log is (default: '<checkpoint>.updates', as the server's)"
    )
    parser.add_argument(
        "--output", "-o", required=True, help="the new base: a .safetensors file, or a row directory for one"
    )
    return run_compact


def run_compact(args: argparse.Namespace) -> int:
    log_dir = Path(args.updates_dir) if args.updates_dir else default_log_dir(args.checkpoint)
    try:
        config = load_model_config(args.model)
        result = compact(config, args.checkpoint, log_dir, args.output)
    except (ConfigError, CheckpointError) as err:
        print(f"embserve compact: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{result.output}: version {result.version}, {result.folded_through} updates ({result.rows:,} rows) of "
        f"{result.folded_base} folded in"
    )
    return 0
