"""Start-up checks: what `embserve serve` verifies before it builds the model, and the one-line error it prints.

Everything a person can get wrong in the command or the files (a missing or misshapen checkpoint, a bad model
YAML, a port in use, CUDA asked for on a CPU host, a TLS or token file that is not there) is found here, in a
second or two, instead of after the model build; each failure is a `StartupError` whose message names what to fix.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ServerConfig

if TYPE_CHECKING:
    from embserve.embeddings.config import ModelConfig

__all__ = ["StartupError", "check_port_free", "check_startup", "one_line"]


class StartupError(Exception):
    """The server cannot start; the message names the file, field, port or table to fix."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (YAML and pydantic messages span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def check_port_free(host: str, port: int, what: str, flag: str) -> None:
    """Raises `StartupError` if `host:port` cannot be bound (another process holds it, or the address is not
    this host's). Port 0 is always free. The probe socket is closed at once; the server binds the port itself."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise StartupError(f"--host {host!r}: cannot resolve it: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As gRPC and http.server bind: a port left in TIME_WAIT by a server that just exited is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"{what} {port} on {host} is already in use by another process: stop it or choose another "
                    f"port with {flag}"
                ) from None
            raise StartupError(f"{what} {port} on {host}: cannot bind it: {err.strerror}") from None


def _check_file(path: str, flag: str) -> None:
    p = Path(path)
    if not p.exists():
        raise StartupError(f"{flag} {path}: no such file")
    if not p.is_file():
        raise StartupError(f"{flag} {path}: not a file")
    if not os.access(p, os.R_OK):
        raise StartupError(f"{flag} {path}: not readable by this user")


def _shard_of(model: ModelConfig, plan_path: str, shard: int) -> ModelConfig:
    """The sub-model `--shard` serves, after checking the plan against the model."""
    from embserve.embeddings.plan import PlanError, load_plan, shard_model_config

    try:
        plan = load_plan(plan_path, model)
    except PlanError as err:
        raise StartupError(f"--plan: {one_line(err)}") from None
    if shard >= plan.shard_count:
        raise StartupError(
            f"--shard {shard}: plan {plan_path} has {plan.shard_count} shards, 0 to {plan.shard_count - 1}"
        )
    return shard_model_config(model, plan, shard)


def check_startup(config: ServerConfig) -> None:
    """Checks every input of a start that can be checked without building the model.

    Raises:
        StartupError: naming the flag and file, port, field or table at fault.
    """
    from embserve.embeddings import CheckpointError, ConfigError, check_checkpoint, load_model_config
    from embserve.embeddings.config import Storage
    from embserve.embeddings.row_directory import check_row_directory

    try:
        model = load_model_config(config.model)
    except ConfigError as err:
        raise StartupError(f"--model: {one_line(err)}") from None
    whole = model  # a shard's checkpoint file is the whole model's; its row directory is its own
    if config.plan is not None and config.shard is not None:
        model = _shard_of(model, config.plan, config.shard)
    storage = {t.name: t.storage or config.storage for t in model.tables}
    if config.checkpoint is not None and Path(config.checkpoint).is_dir():
        serving_dtypes = {t.name: t.effective_serving_dtype for t in model.tables}
        try:  # headers and sizes only: the time does not grow with the tables
            check_row_directory(model, config.checkpoint, serving_dtypes)
        except CheckpointError as err:
            raise StartupError(f"--checkpoint: {one_line(err)}") from None
    elif config.checkpoint is not None:
        _check_file(config.checkpoint, "--checkpoint")
        try:
            check_checkpoint(whole, config.checkpoint)
        except CheckpointError as err:
            raise StartupError(f"--checkpoint: {one_line(err)}") from None
    away = [name for name, kind in storage.items() if kind is not Storage.MEMORY]
    if away and (config.checkpoint is None or not Path(config.checkpoint).is_dir()):
        raise StartupError(
            f"table {away[0]!r} has storage {storage[away[0]].value}: serve it from a row directory (--checkpoint "
            "DIR, written by embserve export or convert with --storage mmap)"
        )
    on_cuda = config.device.startswith("cuda")
    for name, kind in storage.items():
        if kind is Storage.MMAP and on_cuda:
            raise StartupError(f"table {name!r}: mmap storage serves from the CPU; on --device cuda use managed")
        if kind is Storage.MANAGED and not on_cuda:
            raise StartupError(f"table {name!r}: managed storage needs --device cuda; on the CPU use mmap")
    if config.updates.enabled and config.checkpoint is None and config.updates.log_dir is None:
        raise StartupError(
            "--updates: the delta log lives next to the checkpoint, and there is none (a seeded init): give "
            "--updates-dir"
        )
    if config.updates.enabled and config.updates.compact_after_bytes and config.checkpoint is not None:
        from embserve.embeddings.compact import in_place_problem

        problem = in_place_problem(config.checkpoint)
        if problem is not None:
            raise StartupError(f"--compact-after-bytes with --checkpoint {config.checkpoint}: {problem}")
    if config.tls is not None:
        _check_file(config.tls.cert_file, "--tls-cert")
        _check_file(config.tls.key_file, "--tls-key")
        if config.tls.client_ca_file is not None:
            _check_file(config.tls.client_ca_file, "--tls-client-ca")
    if config.auth is not None:
        _check_file(config.auth.tokens_file, "--auth-tokens-file")
    check_port_free(config.host, config.port, "gRPC port", "--port")
    if config.metrics_port is not None:
        # With --workers N, worker i serves metrics on metrics_port + i.
        for i in range(config.workers):
            check_port_free(config.host, config.metrics_port + i, "metrics port", "--metrics-port (or --no-metrics)")
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise StartupError(
                f"--device {config.device}: CUDA is not available on this host (torch {torch.__version__}, "
                f"{torch.cuda.device_count()} GPUs visible); use --device cpu"
            )
        index = int(config.device[5:]) if ":" in config.device else 0
        if index >= torch.cuda.device_count():
            raise StartupError(f"--device {config.device}: this host has {torch.cuda.device_count()} CUDA device(s)")
