"""Blocking lookups: per-example id lists, then the same features as numpy arrays.

    python examples/sync_lookup.py 127.0.0.1:50051
    python examples/sync_lookup.py 127.0.0.1:50051 --id-feature user --weighted-feature hashtags

The feature names default to the built-in `default` model's (what `make serve` runs).
"""

from __future__ import annotations

import argparse

import numpy as np

from embserve.client import Client

from _print import print_lookup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="server host:port")
    parser.add_argument("--id-feature", default="user_id", help="an unweighted table (default: user_id)")
    parser.add_argument("--weighted-feature", default="hashtags", help="a weighted table (default: hashtags)")
    args = parser.parse_args()
    ids, tags = args.id_feature, args.weighted_feature

    with Client(args.address, timeout=10) as client:
        # 1. Lists: two examples; the second has no hashtags (an empty bag pools to zeros).
        features = {ids: [[42], [43, 7]], tags: [[7, 9], []]}
        weights = {tags: [[0.5, 2.0], []]}
        result = client.lookup(features, weights=weights)
        print_lookup("lists", features, weights, result.keys, result.embeddings, result.model_version)
        # result[ids] is that feature's [batch, dim] slice of the same array.

        # 2. numpy: (lengths, values[, weights]) per key; no per-example Python on either side.
        lengths, values = np.array([1, 2, 0]), np.array([5, 6, 8])
        tag_lengths, tag_values, tag_weights = np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([1.5, 1.0, 0.25], np.float32)
        result = client.lookup({ids: (lengths, values), tags: (tag_lengths, tag_values, tag_weights)})
        as_lists = {ids: [[5], [6, 8], []], tags: [[], [3], [4, 5]]}
        print_lookup("numpy", as_lists, {tags: [[], [1.5], [1.0, 0.25]]}, result.keys, result.embeddings, result.model_version)


if __name__ == "__main__":
    main()
