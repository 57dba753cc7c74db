"""`embserve compact`: fold a base checkpoint's delta log into a new base (see `compact`).

    embserve compact --model model.yaml --checkpoint ranker.safetensors --output ranker-2.safetensors
    embserve compact --model model.yaml --checkpoint rows/ --updates-dir /var/embserve/updates --output rows-2/
    embserve compact --model model.yaml --checkpoint ranker.safetensors --in-place

Prints the new version; serve it (`SIGHUP` after pointing `--checkpoint` at it, or a rolling restart), and the
updates answered since the compaction are carried over from the old log when it loads. `--in-place` puts the new
base at the checkpoint's own path (a safetensors file, or a symbolic link to a row directory; see
`compact_in_place`), so a SIGHUP alone serves it; the server's background compaction runs this. Failures are one
line on stderr and exit code 2; exit code 3: `--if-base` names a base the checkpoint no longer holds (nothing done);
exit code 4: another compaction of the same logs is running (nothing done).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .compact import Compaction, CompactionRunning, compact, compact_in_place
from .config import ConfigError, load_model_config
from .delta_log import default_log_dir
from .errors import CheckpointError

__all__ = ["EXIT_OTHER_BASE", "EXIT_RUNNING", "compact_command", "run_compact"]

EXIT_OTHER_BASE = 3
EXIT_RUNNING = 4


def compact_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Fold a checkpoint's delta log of row updates into a new checkpoint."""
    parser.add_argument("--model", required=True, help="model config: a YAML path or a built-in name")
    parser.add_argument("--checkpoint", required=True, help="the base: a checkpoint file or a row directory")
    parser.add_argument(
        "--updates-dir", help="where the base's delta log is (default: '<checkpoint>.updates', as the server's)"
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", "-o", help="the new base: a .safetensors file, or a row directory for one")
    where.add_argument(
        "--in-place",
        action="store_true",
        help="put the new base at the checkpoint's path (a .safetensors file, or a symbolic link to a row directory)",
    )
    parser.add_argument(
        "--if-base", metavar="VERSION", help="with --in-place: only if the checkpoint still holds this base"
    )
    return run_compact


def run_compact(args: argparse.Namespace) -> int:
    if args.if_base is not None and not args.in_place:
        print("embserve compact: error: --if-base goes with --in-place", file=sys.stderr)
        return 2
    log_dir = Path(args.updates_dir) if args.updates_dir else default_log_dir(args.checkpoint)
    # A stop (the server's, at its own stop) unwinds like an error: the temporary output is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result: Compaction | None
    try:
        config = load_model_config(args.model)
        if args.in_place:
            result = compact_in_place(config, args.checkpoint, log_dir, if_base=args.if_base)
        else:
            result = compact(config, args.checkpoint, log_dir, args.output)
    except CompactionRunning as err:
        print(f"embserve compact: {err}", file=sys.stderr)
        return EXIT_RUNNING
    except (ConfigError, CheckpointError) as err:
        print(f"embserve compact: error: {err}", file=sys.stderr)
        return 2
    if result is None:
        print(f"{args.checkpoint}: holds another base than {args.if_base}; nothing to do")
        return EXIT_OTHER_BASE
    print(
        f"{result.output}: version {result.version}, {result.folded_through} updates ({result.rows:,} rows) of "
        f"{result.folded_base} folded in"
    )
    return 0
