"""The `embserve` command line, and its `query` command: call a running server and print a readable result.

Other commands (`serve`, ...) are entry points of the group `embserve.commands`, loaded only when named, so that
`embserve query` runs in a client-only install and never imports the server.

    embserve query --address 127.0.0.1:50051 --feature user_id=42 --feature hashtags=7,9
    embserve query --feature "user_id=42|43" --feature "hashtags=7,9|"     # two examples
    embserve query --feature "hashtags=7,9|3" --weight "hashtags=0.5,2|1"  # per-id weights, in the ids' shape
    embserve query --metadata             # tables and the server's request limits (--json: as JSON)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import numpy as np

from embserve.v1.wire import OutputDType

from ._base import DEFAULT_TIMEOUT_S
from .errors import EmbserveError
from .result import ModelInfo
from .sync import Client

__all__ = ["add_query_args", "main", "run_query"]

COMMANDS_GROUP = "embserve.commands"


DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_PRECISION = 4


def add_query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        action="append",
        metavar="HOST:PORT",
        help=f"server address; repeat for replicas, spread round-robin (default: {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="KEY=IDS",
        help="ids of one key: examples separated by '|', ids by ','; an example may be empty (no ids), an id may not; "
        "e.g. hashtags=1,2|3 (default: none; give at least one unless --metadata or --health)",
    )
    p.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="KEY=WEIGHTS",
        help="per-id weights of a --feature key, in its ids' shape: examples separated by '|', weights by ','; "
        "e.g. hashtags=0.5,2|1 (default: none; every id weighs 1)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=[d.value for d in OutputDType],
        help="element type of the returned embeddings (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="deadline of each call, in seconds (default: %(default)s s)",
    )
    p.add_argument("--token", help="bearer token sent as 'authorization: Bearer ...' (default: none)")
    p.add_argument(
        "--metadata",
        action="store_true",
        help="print the model's tables and the server's request limits instead of a lookup (default: off)",
    )
    p.add_argument("--health", action="store_true", help="print the gRPC health status instead (default: off)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the whole result (lookup or --metadata) as one JSON object (default: off, a readable table)",
    )
    p.add_argument(
        "--precision",
        type=int,
        default=DEFAULT_PRECISION,
        metavar="DIGITS",
        help="decimal digits printed per value, ignored with --json (default: %(default)s)",
    )


def _parse_ids(spec: str, key: str, example: int, text: str) -> list[int]:
    if not text.strip():
        return []  # an example with no ids: an empty bag
    ids = []
    for i, item in enumerate(text.split(",")):
        if not item.strip():
            raise EmbserveError(
                f"--feature {spec!r}: key {key!r}, example {example}: id {i} is empty (two commas in a row, or a "
                "comma at either end); write ids as 1,2,3 and separate examples with '|'"
            )
        try:
            ids.append(int(item))
        except ValueError:
            raise EmbserveError(
                f"--feature {spec!r}: key {key!r}, example {example}: {item.strip()!r} is not an integer id"
            ) from None
    return ids


def _parse_weights(spec: str, key: str, example: int, text: str) -> list[float]:
    if not text.strip():
        return []
    weights = []
    for i, item in enumerate(text.split(",")):
        try:
            weights.append(float(item))
        except ValueError:
            raise EmbserveError(
                f"--weight {spec!r}: key {key!r}, example {example}: weight {i} ({item.strip()!r}) is not a number"
            ) from None
    return weights


def _parse_feature_weights(specs: list[str], features: dict[str, list[list[int]]]) -> dict[str, list[list[float]]]:
    """The `--weight` specs, each checked against its key's ids: the same examples, one weight per id."""
    out: dict[str, list[list[float]]] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not sep or not key:
            raise EmbserveError(f"--weight {spec!r} is not KEY=WEIGHTS")
        if key in out:
            raise EmbserveError(f"--weight {spec!r}: key {key!r} given twice; put all its examples in one --weight")
        if key not in features:
            raise EmbserveError(
                f"--weight {spec!r}: key {key!r} has no --feature; give its ids with --feature {key}=IDS"
            )
        weights = [_parse_weights(spec, key, n, ex) for n, ex in enumerate(text.split("|"))]
        ids = features[key]
        if len(weights) != len(ids):
            raise EmbserveError(
                f"--weight {spec!r}: key {key!r} has {len(weights)} examples, its --feature has {len(ids)}"
            )
        for n, (w, i) in enumerate(zip(weights, ids)):
            if len(w) != len(i):
                raise EmbserveError(f"--weight {spec!r}: key {key!r}, example {n}: {len(w)} weights for {len(i)} ids")
        out[key] = weights
    return out


def _parse_features(specs: list[str]) -> dict[str, list[list[int]]]:
    features: dict[str, list[list[int]]] = {}
    for spec in specs:
        key, sep, ids = spec.partition("=")
        if not sep or not key:
            raise EmbserveError(f"--feature {spec!r} is not KEY=IDS")
        if key in features:
            raise EmbserveError(f"--feature {spec!r}: key {key!r} given twice; put all its examples in one --feature")
        features[key] = [_parse_ids(spec, key, n, ex) for n, ex in enumerate(ids.split("|"))]
    return features


def _metadata_dict(info: ModelInfo) -> dict[str, Any]:
    out = dataclasses.asdict(info)
    out["keys"] = list(info.keys)
    out["tables"] = [dataclasses.asdict(t) for t in info.tables]
    return out


def _print_metadata(info: ModelInfo) -> None:
    print(f"model {info.name} version {info.version} on {info.device} ({info.engine}), output dim {info.output_dim}")
    print(f"{'table':<20} {'rows':>10} {'dim':>5} {'serving':>8} {'MiB':>9} weighted ids     storage  resident MiB")
    for t in info.tables:
        print(
            f"{t.name:<20} {t.num_embeddings:>10} {t.embedding_dim:>5} {t.serving_dtype:>8} "
            f"{t.weight_bytes / 2**20:>9.1f} {str(t.weighted):<8} {t.id_policy:<8} {t.storage:<8} "
            f"{t.resident_bytes / 2**20:>12.1f}"
        )
    print("limits:")
    print(f"  max_batch_size          {info.max_batch_size:>12,}  examples per forward (larger requests run alone)")
    print(f"  max_request_examples    {info.max_request_examples:>12,}  examples in one request")
    print(f"  max_request_ids         {info.max_request_ids:>12,}  ids in one request")
    print(f"  max_message_bytes       {info.max_message_bytes:>12,}  bytes in one request message")
    if info.max_stream_outstanding:
        print(f"  max_stream_outstanding  {info.max_stream_outstanding:>12,}  LookupStream messages in progress")
    for name, what in (
        ("max_response_bytes", "bytes in one response"),
        ("max_queue_bytes", "bytes of queued requests and their responses"),
        ("max_pending_response_bytes", "response bytes not yet sent"),
        ("max_receive_bytes", "bytes of requests being received"),
    ):
        if getattr(info, name):
            print(f"  {name:<23} {getattr(info, name):>12,}  {what}")


def run_query(args: argparse.Namespace) -> int:
    try:
        return _query(args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


def _query(args: argparse.Namespace) -> int:
    addresses = args.address or [DEFAULT_ADDRESS]
    try:
        features = _parse_features(args.feature)
        weights = _parse_feature_weights(args.weight, features)
    except EmbserveError as err:
        print(f"embserve query: {err}", file=sys.stderr)
        return 2
    try:
        with Client(addresses, timeout=args.timeout, token=args.token) as client:
            if args.health:
                print(client.health())
                return 0
            if args.metadata:
                info = client.metadata()
                if args.json:
                    print(json.dumps(_metadata_dict(info)))
                else:
                    _print_metadata(info)
                return 0
            if not features:
                print("embserve query: give at least one --feature KEY=IDS (or --metadata / --health)", file=sys.stderr)
                return 2
            result = client.lookup(features, weights=weights or None, output_dtype=args.dtype)
    except EmbserveError as err:
        print(f"embserve query: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "model": result.model_name,
                    "version": result.model_version,
                    "embeddings": {k: result[k].astype(float).tolist() for k in result.keys},
                }
            )
        )
        return 0
    print(
        f"model {result.model_name} version {result.model_version}: {result.batch_size} x {result.embeddings.shape[1]} {result.dtype}"
    )
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
