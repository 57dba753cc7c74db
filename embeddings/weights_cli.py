"""`embserve export` and `embserve convert`: write servable checkpoints (see `docs/weights.md`).

`export` writes a model's weights from the deterministic init (`--seed`) or re-saves a loaded checkpoint;
`convert` turns a trained model's weights (a state dict with any key prefix, or a `torch.distributed.checkpoint`
directory of a sharded model) into a checkpoint and its model YAML. Failures are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, ModelConfig, load_model_config
from .convert import ConvertError, convert, write_model_yaml
from .large_embeddings import LargeEmbeddings
from .weights import CheckpointError, checkpoint_digest, init_weights, load_checkpoint, save_checkpoint

__all__ = ["add_convert_args", "add_export_args", "convert_command", "export_command", "run_convert", "run_export"]

DEFAULT_SEED = 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model config: a YAML path or a built-in name (default: default)")
    p.add_argument("--checkpoint", help="re-save this checkpoint (.safetensors or torch state dict) instead of an init")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"init seed without --checkpoint (default: {DEFAULT_SEED})")
    p.add_argument("--output", "-o", required=True, help="checkpoint to write: .safetensors (or a torch file)")
    p.add_argument("--model-out", help="also write the model config as YAML here")


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="trained weights: a state-dict file (torch or .safetensors) or a DCP directory")
    p.add_argument("--output", "-o", required=True, help="checkpoint to write: .safetensors (or a torch file)")
    p.add_argument("--model-out", help="model YAML to write (default: the output path with .yaml)")
    p.add_argument("--model", help="model config to check the weights against and to write (default: inferred)")
    p.add_argument("--name", help="model name when inferred (default: the output file's stem)")
    p.add_argument(
        "--ignore-other-keys",
        action="store_true",
        help="skip keys that are not embedding-table weights (dense layers, counters) instead of failing",
    )


def export_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Write a checkpoint from the seeded init or re-save a loaded one as safetensors."""
    add_export_args(parser)
    return run_export


def convert_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Turn trained weights (a state dict, a DCP directory) into a servable checkpoint and its model YAML."""
    add_convert_args(parser)
    return run_convert


def _fail(command: str, err: Exception) -> int:
    print(f"embserve {command}: error: {err}", file=sys.stderr)
    return 2


def run_export(args: argparse.Namespace) -> int:
    try:
        config = load_model_config(args.model)
        model = LargeEmbeddings(config, device="cpu")
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        else:
            init_weights(model, args.seed)
        save_checkpoint(model, args.output)
        if args.model_out:
            write_model_yaml(config, args.model_out)
    except (ConfigError, CheckpointError, OSError) as err:
        return _fail("export", err)
    _report(config, args.output, args.model_out)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    model_out = args.model_out or str(Path(args.output).with_suffix(".yaml"))
    try:
        given: ModelConfig | None = load_model_config(args.model) if args.model else None
        config = convert(
            args.source,
            args.output,
            model=given,
            name=args.name,
            model_yaml=model_out,
            ignore_other_keys=args.ignore_other_keys,
        )
    except (ConfigError, ConvertError, CheckpointError, OSError) as err:
        return _fail("convert", err)
    _report(config, args.output, model_out)
    return 0


def _report(config: ModelConfig, output: str, model_out: str | None) -> None:
    tables = ", ".join(f"{t.name} {t.num_embeddings}x{t.embedding_dim} {t.data_type.value}" for t in config.tables)
    print(f"wrote {output} (ckpt-{checkpoint_digest(output)}): {tables}")
    if model_out:
        print(f"wrote {model_out}: serve with --model {model_out} --checkpoint {output}")
