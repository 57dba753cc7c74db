"""`embserve query`: call a running server and print a readable result.

    embserve query --address 127.0.0.1:50051 --feature user_id=42 --feature hashtags=7,9
    embserve query --feature "user_id=42|43" --feature "hashtags=7,9|"     # two examples
    embserve query --metadata
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .errors import EmbserveError
from .sync import Client

__all__ = ["add_query_args", "run_query"]


def add_query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", action="append", help="server host:port, repeat for replicas (default 127.0.0.1:50051)")
    p.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="KEY=IDS",
        help="ids of one key: examples separated by '|', ids by ','; e.g. hashtags=1,2|3",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--token", help="bearer token")
    p.add_argument("--metadata", action="store_true", help="print the model's metadata instead")
    p.add_argument("--health", action="store_true", help="print the health status instead")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--precision", type=int, default=4)


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
