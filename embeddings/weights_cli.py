"""`embserve export` and `embserve convert`: write servable checkpoints (see `docs/weights.md`).

`export` writes a model's weights from the deterministic init (`--seed`) or re-saves a loaded checkpoint;
`convert` turns a trained model's weights (a state dict with any key prefix, or a `torch.distributed.checkpoint`
directory of a sharded model) into a checkpoint and its model YAML. Both print the version clients will see
(`<file stem>-<digest>`); `convert` also prints the response's column order and where it came from. Failures are one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from .config import ConfigError, ModelConfig, Storage, load_model_config
from .convert import ConvertError, convert, write_model_yaml
from .large_embeddings import LargeEmbeddings, canonical_keys
from .row_directory import (
    MODEL_FILE,
    check_row_directory,
    row_directory_version,
    verify_row_directory,
    write_row_directory,
)
from .weights import (
    CheckpointError,
    checkpoint_digest,
    checkpoint_version,
    init_weights,
    load_checkpoint,
    save_checkpoint,
    table_weights,
)

__all__ = [
    "add_convert_args",
    "add_export_args",
    "convert_command",
    "export_command",
    "run_convert",
    "run_export",
    "run_verify",
    "verify_command",
]

DEFAULT_SEED = 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model config: a YAML path or a built-in name (default: default)")
    p.add_argument("--checkpoint", help="re-save this checkpoint (.safetensors or torch state dict) instead of an init")
    p.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"init seed without --checkpoint (default: {DEFAULT_SEED})"
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        help="checkpoint to write: .safetensors (or a torch file); with --storage, the row directory to write",
    )
    p.add_argument("--model-out", help="also write the model config as YAML here")
    p.add_argument(
        "--plan",
        help="sharding plan (embserve plan): write one row directory per shard, OUTPUT/shard-K, each holding that "
        "shard's tables and rows (needs --storage); serve shard K with --plan and --shard K --checkpoint OUTPUT/shard-K",
    )
    _add_storage_arg(p)


def _add_storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        choices=[s.value for s in Storage],
        help="write a row directory instead of a checkpoint file: one row file per table, in its serving dtype and "
        "the fused engine's layout, to serve in place (mmap) or load at once, with model.yaml naming this storage "
        "for every table (default: a checkpoint file)",
    )


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="trained weights: a state-dict file (torch or .safetensors) or a DCP directory")
    p.add_argument("--output", "-o", required=True, help="checkpoint to write: .safetensors (or a torch file)")
    p.add_argument("--model-out", help="model YAML to write (default: the output path with .yaml)")
    p.add_argument(
        "--model",
        help="the training config: the weights are checked against it (names, shapes, data types) and it is "
        "written, in its table order (default: inferred)",
    )
    p.add_argument(
        "--order",
        metavar="TABLE,...",
        help="table order of an inferred config, i.e. of the response's columns (default: the source's key order, "
        "where it is the training order; refused where it cannot be known)",
    )
    p.add_argument(
        "--cast",
        action="append",
        nargs="?",
        const="",
        metavar="TABLE=DTYPE,...",
        help="store a table in another data type than its weights' (fp32, fp16); bare --cast: each table in its "
        "--model data type (default: none; a data type other than the weights' is refused)",
    )
    p.add_argument("--name", help="model name when inferred (default: the output file's stem)")
    p.add_argument(
        "--ignore-other-keys",
        action="store_true",
        help="skip keys that are not embedding-table weights (dense layers, counters) instead of failing",
    )
    _add_storage_arg(p)


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


def _export_shards(args: argparse.Namespace) -> int:
    from .plan import PlanError, load_plan, shard_model_config
    from .shard_weights import shard_weights

    try:
        if not args.storage:
            raise PlanError("--plan writes row directories: give --storage (memory or mmap)")
        config = load_model_config(args.model)
        plan = load_plan(args.plan, config)
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        source = f"exported from {args.checkpoint or f'init-{args.seed}'}"
        for shard in plan.shards:
            sub = shard_model_config(config, plan, shard.index)
            weights = shard_weights(config, plan, shard.index, checkpoint=args.checkpoint, seed=args.seed)
            directory = out / f"shard-{shard.index}"
            version = write_row_directory(sub, weights, directory, source=source, storage=Storage(args.storage))
            _report(sub, str(directory), None, version)
    except (ConfigError, CheckpointError) as err:
        return _fail("export", err)
    except OSError as err:
        return _fail("export", ConvertError(f"{err.filename or args.output}: cannot write: {err.strerror or err}"))
    print(f"serve shard K with --model {args.model} --plan {args.plan} --shard K --checkpoint {out}/shard-K")
    return 0


def run_export(args: argparse.Namespace) -> int:
    if getattr(args, "plan", None):
        return _export_shards(args)
    try:
        config = load_model_config(args.model)
        model = LargeEmbeddings(config, device="cpu")
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        else:
            init_weights(model, args.seed)
        if args.storage:
            weights = {name: param.detach() for name, param in table_weights(model).items()}
            source = f"exported from {args.checkpoint or f'init-{args.seed}'}"
            version = write_row_directory(config, weights, args.output, source=source, storage=Storage(args.storage))
            config = load_model_config(Path(args.output) / MODEL_FILE)
        else:
            save_checkpoint(model, args.output)
            version = checkpoint_version(args.output, checkpoint_digest(args.output))
        if args.model_out:
            write_model_yaml(config, args.model_out)
    except (ConfigError, CheckpointError) as err:
        return _fail("export", err)
    except OSError as err:
        return _fail("export", ConvertError(f"{err.filename or args.output}: cannot write: {err.strerror or err}"))
    _report(config, args.output, args.model_out or _model_in(args), version)
    return 0


def _model_in(args: argparse.Namespace) -> str | None:
    """The model YAML a row directory carries, when one was written."""
    return str(Path(args.output) / MODEL_FILE) if args.storage else None


def _order(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    names = [n.strip() for n in spec.split(",")]
    if not all(names):
        raise ConvertError(f"--order {spec!r}: an empty table name; write the tables as a,b,c")
    return names


def _casts(specs: list[str] | None, model: ModelConfig | None) -> dict[str, str] | None:
    if not specs:
        return None
    out: dict[str, str] = {}
    for spec in specs:
        if not spec:
            if model is None:
                raise ConvertError(
                    "a bare --cast stores each table in its --model data type; give --model, or TABLE=DTYPE"
                )
            out.update({t.name: t.data_type.value for t in model.tables})
            continue
        for item in spec.split(","):
            table, sep, dtype = (part.strip() for part in item.partition("="))
            if not sep or not table or not dtype:
                raise ConvertError(f"--cast {spec!r}: expected TABLE=DTYPE, e.g. user=fp16")
            out[table] = dtype
    return out


def run_convert(args: argparse.Namespace) -> int:
    model_out = args.model_out or (None if args.storage else str(Path(args.output).with_suffix(".yaml")))
    try:
        given: ModelConfig | None = load_model_config(args.model) if args.model else None
        result = convert(
            args.source,
            args.output,
            model=given,
            order=_order(args.order),
            cast=_casts(args.cast, given),
            name=args.name,
            model_yaml=model_out,
            ignore_other_keys=args.ignore_other_keys,
            storage=args.storage,
        )
    except (ConfigError, ConvertError) as err:
        return _fail("convert", err)
    _report(result.config, args.output, model_out or _model_in(args), result.version, result.casts)
    columns = canonical_keys(result.config)
    print(f"response columns: {', '.join(columns)} (table order from {result.order_from})")
    return 0


def _report(
    config: ModelConfig, output: str, model_out: str | None, version: str, casts: Mapping[str, str] | None = None
) -> None:
    casts = casts or {}
    tables = ", ".join(
        f"{t.name} {t.num_embeddings}x{t.embedding_dim} {t.data_type.value}"
        + (f" (cast from {casts[t.name]})" if t.name in casts else "")
        for t in config.tables
    )
    print(f"wrote {output} (version {version}): {tables}")
    if model_out:
        print(f"wrote {model_out}: serve with --model {model_out} --checkpoint {output}")


def verify_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Check a row directory's files against the digests recorded when they were written (reads every row)."""
    parser.add_argument("directory", help="the row directory (written by export or convert with --storage)")
    parser.add_argument("--model", help="the model config (default: the directory's model.yaml)")
    return run_verify


def run_verify(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    try:
        config = load_model_config(args.model or directory / MODEL_FILE)
        check_row_directory(config, directory, {t.name: t.effective_serving_dtype for t in config.tables})
        for header in verify_row_directory(config, directory):
            print(
                f"{header.table}: {header.num_embeddings} x {header.embedding_dim} {header.serving_dtype.value}, "
                f"digest {header.digest[:12]} ok"
            )
    except (ConfigError, CheckpointError) as err:
        return _fail("verify", err)
    print(f"{directory}: version {row_directory_version(config, directory)}, every row matches its digest")
    return 0
