"""A torchrec `KeyedJaggedTensor` in, a `KeyedTensor` out: drop-in for a model's sparse arch (needs torch and torchrec).

    python examples/kjt_lookup.py 127.0.0.1:50051
"""

from __future__ import annotations

import argparse

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embserve.client import Client

from _print import print_lookup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="server host:port")
    parser.add_argument("--id-feature", default="user_id", help="an unweighted table (default: user_id)")
    parser.add_argument("--weighted-feature", default="hashtags", help="a weighted table (default: hashtags)")
    args = parser.parse_args()
    ids, tags = args.id_feature, args.weighted_feature

    # Two examples. Lengths are feature-major: both examples of `ids`, then both of `tags`. A KJT has weights for
    # every id or none, so the unweighted table's ids carry 1.0.
    kjt = KeyedJaggedTensor(
        keys=[ids, tags],
        values=torch.tensor([11, 12, 13, 21, 22, 23]),
        lengths=torch.tensor([1, 2, 2, 1], dtype=torch.int32),
        weights=torch.tensor([1.0, 1.0, 1.0, 0.5, 2.0, 3.0]),
    )
    with Client(args.address, timeout=10) as client:
        result = client.lookup(kjt)
    kt = result.to_torch()  # torchrec KeyedTensor: kt.keys(), kt.values(), kt[key], kt.to_dict()
    assert isinstance(kt.values(), torch.Tensor)
    print_lookup(
        "kjt",
        {ids: [[11], [12, 13]], tags: [[21, 22], [23]]},
        {tags: [[0.5, 2.0], [3.0]]},
        kt.keys(),
        kt.values().numpy(),
        result.model_version,
    )


if __name__ == "__main__":
    main()
