"""Push freshly trained rows to a serving model, without a new checkpoint.

Saves a seed `LargeEmbeddings` model's checkpoint and serves it with row updates on (`embserve serve --updates`);
then trains the same module a few steps on CPU, takes the delta (the rows the steps touched: the ids of its
batches, which is what torchrec's `ModelDeltaTracker.get_unique_ids()` reports in a distributed job) with their new
values, writes it as a delta file, and pushes it with `embserve update`. Checks that every touched row is served
as trained (fp32 exactly, fp16 as the module rounds it) and the untouched ones as before, and prints one JSON line.

    python examples/fresh_rows.py [--dir DIR] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.numpy import save_file
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embserve.client import Client
from embserve.embeddings import LargeEmbeddings, init_weights, model_config_from_dict, save_checkpoint, table_weights

MODEL = {
    "name": "fresh",
    "tables": [
        {"name": "user", "num_embeddings": 10_000, "embedding_dim": 32},
        {"name": "author", "num_embeddings": 2_000, "embedding_dim": 16, "data_type": "fp16"},
    ],
}
BATCH = 64


def batch(rng: np.random.Generator, keys: list[str], rows: dict[str, int]) -> KeyedJaggedTensor:
    lengths = rng.integers(1, 4, size=(len(keys), BATCH))
    values = np.concatenate([rng.integers(0, rows[k], size=int(lengths[i].sum())) for i, k in enumerate(keys)])
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths.reshape(-1)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the model, checkpoint and delta (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="embserve-fresh-"))
    work.mkdir(parents=True, exist_ok=True)
    config = model_config_from_dict(MODEL)
    (work / "model.yaml").write_text(yaml.safe_dump(MODEL, sort_keys=False))
    module = LargeEmbeddings(config)
    init_weights(module, 0)
    save_checkpoint(module, work / "weights.safetensors")
    before = {k: v.detach().float().numpy().copy() for k, v in table_weights(module).items()}

    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "embserve"), "serve", "--model", str(work / "model.yaml"), "--checkpoint",
               str(work / "weights.safetensors"), "--updates", "--port", "0", "--no-metrics"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        address = ""
        assert server.stderr is not None
        for line in server.stderr:
            if '"serving"' in line:
                address = json.loads(line)["address"]
                break
        if not address:
            raise SystemExit(f"the server did not start (exit {server.wait()})")

        # Train: a toy objective on random batches; the touched ids are the delta.
        keys = [t.name for t in config.tables]
        rows = {t.name: t.num_embeddings for t in config.tables}
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        rng = np.random.default_rng(7)
        touched: dict[str, set[int]] = {k: set() for k in keys}
        for _ in range(args.steps):
            features = batch(rng, keys, rows)
            for k in keys:
                touched[k].update(features[k].values().tolist())
            loss = module(features).values().float().pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained = {k: v.detach().float().numpy() for k, v in table_weights(module).items()}
        delta: dict[str, np.ndarray] = {}
        for k in keys:
            ids = np.array(sorted(touched[k]), dtype=np.int64)
            delta[f"{k}.ids"], delta[f"{k}.rows"] = ids, trained[k][ids]
        save_file(delta, str(work / "delta.safetensors"))

        started = time.perf_counter()
        pushed = subprocess.run([str(bin_dir / "embserve"), "update", "--address", address,
                                 str(work / "delta.safetensors")], capture_output=True, text=True, check=False)
        if pushed.returncode != 0:
            raise SystemExit(f"embserve update failed: {pushed.stdout}{pushed.stderr}")
        push_s = time.perf_counter() - started

        with Client(address) as client:
            for k in keys:
                ids = np.arange(rows[k])
                served = np.concatenate([client.lookup({k: [[int(i)] for i in part]})[k]
                                         for part in np.array_split(ids, 10)])
                changed = np.array(sorted(touched[k]))
                untouched = np.setdiff1d(ids, changed)
                if not np.array_equal(served[changed], trained[k][changed]):
                    raise SystemExit(f"table {k}: a touched row is not served as trained")
                if not np.array_equal(served[untouched], before[k][untouched]):
                    raise SystemExit(f"table {k}: an untouched row changed")
            version = client.metadata().version
        print(json.dumps({
            "example": "fresh_rows",
            "steps": args.steps,
            "rows_pushed": {k: len(touched[k]) for k in keys},
            "push_s": round(push_s, 3),
            "version": version,
            "update": pushed.stdout.strip(),
        }))
    finally:
        server.terminate()
        server.wait(60)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
