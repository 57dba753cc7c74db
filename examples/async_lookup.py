"""Concurrent lookups with `AsyncClient` over several replicas (gRPC round_robin spreads the calls).

    python examples/async_lookup.py 10.0.0.1:50051 10.0.0.2:50051
    python examples/async_lookup.py dns:///embserve.default.svc:50051     # a Kubernetes headless Service
"""

from __future__ import annotations

import argparse
import asyncio

from embserve.client import AsyncClient

from _print import print_lookup


async def run(addresses: list[str], feature: str, calls: int) -> None:
    target = addresses[0] if len(addresses) == 1 else addresses
    async with AsyncClient(target, timeout=10) as client:
        requests = [{feature: [[i], [i + 1, i + 2]]} for i in range(calls)]
        results = await asyncio.gather(*(client.lookup(r) for r in requests))
        for features, result in zip(requests, results):
            print_lookup("async", features, None, result.keys, result.embeddings, result.model_version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("addresses", nargs="+", help="host:port of each replica, or one gRPC target")
    parser.add_argument("--feature", default="user_id", help="table to look up (default: user_id)")
    parser.add_argument("--calls", type=int, default=8, help="concurrent calls (default: 8)")
    args = parser.parse_args()
    asyncio.run(run(args.addresses, args.feature, args.calls))


if __name__ == "__main__":
    main()
