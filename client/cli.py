"""The `embserve` command line, and its `query` command: call a running server and print a readable result.

Other commands (`serve`, ...) are entry points of the group `embserve.commands`, loaded only when named, so that
`embserve query` runs in a client-only install and never imports the server.

    embserve query --address 127.0.0.1:50051 --feature user_id=42 --feature hashtags=7,9
    embserve query --feature "user_id=42|43" --feature "hashtags=7,9|"     # two examples
    embserve query --metadata
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

import numpy as np

from embserve.v1.wire import DTYPE_NAMES

from .errors import EmbserveError
from .sync import Client

__all__ = ["add_query_args", "main", "run_query"]

COMMANDS_GROUP = "embserve.commands"


def add_query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", action="append", help="server host:port, repeat for replicas (default 127.0.0.1:50051)")
    p.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="KEY=IDS",
        help="ids of one key: examples separated by '|', ids by ','; e.g. hashtags=1,2|3",
    )
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES), help="output element type (default: float32)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default: 5)")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--metadata", action="store_true", help="print the model's metadata instead")
    p.add_argument("--health", action="store_true", help="print the health status instead")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--precision", type=int, default=4, help="decimals printed (default: 4)")


def _parse_features(specs: list[str]) -> dict[str, list[list[int]]]:
    features: dict[str, list[list[int]]] = {}
    for spec in specs:
        key, sep, ids = spec.partition("=")
        if not sep or not key:
            raise EmbserveError(f"--feature {spec!r} is not KEY=IDS")
        try:
            features[key] = [[int(i) for i in ex.split(",") if i.strip()] for ex in ids.split("|")]
        except ValueError:
            raise EmbserveError(f"--feature {spec!r}: ids must be integers") from None
    return features


def run_query(args: argparse.Namespace) -> int:
    try:
        return _query(args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


def _query(args: argparse.Namespace) -> int:
    addresses = args.address or ["127.0.0.1:50051"]
    try:
        with Client(addresses, timeout=args.timeout, token=args.token) as client:
            if args.health:
                print(client.health())
                return 0
            if args.metadata:
                info = client.metadata()
                print(f"model {info.name} version {info.version} on {info.device} ({info.engine})")
                print(f"{'table':<20} {'rows':>10} {'dim':>5} {'serving':>8} {'MiB':>9} weighted ids")
                for t in info.tables:
                    print(
                        f"{t.name:<20} {t.num_embeddings:>10} {t.embedding_dim:>5} {t.serving_dtype:>8} "
                        f"{t.weight_bytes / 2**20:>9.1f} {str(t.weighted):<8} {t.id_policy}"
                    )
                return 0
            if not args.feature:
                print("embserve query: give at least one --feature KEY=IDS (or --metadata / --health)", file=sys.stderr)
                return 2
            result = client.lookup(_parse_features(args.feature), output_dtype=args.dtype)
    except EmbserveError as err:
        print(f"embserve query: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"model": result.model_name, "version": result.model_version, "embeddings": {
            k: result[k].astype(float).tolist() for k in result.keys}}))
        return 0
    print(f"model {result.model_name} version {result.model_version}: {result.batch_size} x {result.embeddings.shape[1]} {result.dtype}")
    with np.printoptions(precision=args.precision, suppress=True, threshold=8, edgeitems=3):
        for key in result.keys:
            print(f"  {key:<20} {result[key]}".replace("\n", "\n" + " " * 23))
    return 0


def _version() -> str:
    try:
        return metadata.version("embserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """`embserve <command> ...`: `query` here; the other commands from the `embserve.commands` entry points."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {ep.name: ep for ep in metadata.entry_points(group=COMMANDS_GROUP)}
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="embserve", description="gRPC batched feature server for embedding tables")
    parser.add_argument("--version", action="version", version=f"embserve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners: dict[str, Callable[[argparse.Namespace], int]] = {"query": run_query}
    add_query_args(sub.add_parser("query", help="call a running server and print the result"))
    for name in sorted(commands):
        if name != chosen:
            sub.add_parser(name, help=f"see embserve {name} --help")
            continue
        try:
            configure = commands[name].load()
        except ImportError as err:
            print(f"embserve {name} needs the server extra (pip install 'embserve[server]'): {err}", file=sys.stderr)
            return 2
        doc = (configure.__doc__ or "").strip().splitlines()
        command_parser = sub.add_parser(name, help=doc[0] if doc else None, description=doc[0] if doc else None)
        runners[name] = configure(command_parser)
    args = parser.parse_args(argv)
    return int(runners[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
