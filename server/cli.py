"""`embserve` command line: `serve` runs the server, `query` calls one (see `embserve.client.cli`).

Heavy imports (torch, torchrec) happen only in `serve`, so `embserve query` works in a client-only install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="server YAML file (flags below override it)")
    p.add_argument("--model", help="model config: a YAML path or a built-in name (default, twhin_local)")
    p.add_argument("--checkpoint", help="weights: .safetensors or torch state-dict file (default: seeded init)")
    p.add_argument("--seed", type=int, help="init seed when there is no checkpoint")
    p.add_argument("--model-version", help="version string reported to clients")
    p.add_argument("--engine", choices=["fused", "eager"], help="fused torchrec inference collection, or eager")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--shard-devices", type=int, help="split the tables over this many devices (torchrec sharding)")
    p.add_argument("--sharding", choices=["table_wise", "row_wise"], help="how tables are split (default table_wise)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464)")
    p.add_argument("--no-metrics", action="store_true", help="no Prometheus endpoint")
    p.add_argument("--grace-period", type=float, dest="grace_period_s", help="seconds to drain on SIGTERM")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-batching", action="store_true", help="one forward per request")
    p.add_argument("--batch-policy", choices=["eager", "wait"], help="when a batch is formed (see README)")
    p.add_argument("--max-batch-size", type=int, help="examples per forward")
    p.add_argument("--max-queue-delay-us", type=int, help="wait policy: longest wait for a fuller batch")
    p.add_argument("--max-queue-size", type=int, help="examples queued before RESOURCE_EXHAUSTED")
    p.add_argument("--max-inflight-batches", type=int, help="batches assembled/computed concurrently")
    p.add_argument("--max-request-examples", type=int, help="largest batch_size of one request")
    p.add_argument("--max-request-ids", type=int, help="most ids in one request")
    p.add_argument("--max-message-bytes", type=int, help="largest request message received")
    p.add_argument("--max-queue-wait-ms", type=float, help="queue budget: longer waits answer RESOURCE_EXHAUSTED")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA: require client certificates it signed (mutual TLS)")
    p.add_argument("--auth-tokens-file", help="bearer tokens file: lines '<token> <methods|*>'")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port and the weights")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=["json", "text"], default="json")


def _serve(args: argparse.Namespace) -> int:
    try:
        from embserve.embeddings import SelfCheckFailed

        from .app import run_server
        from .config import load_server_config
        from .workers import run_workers
        from .logs import configure_logging
    except ImportError as err:
        print(f"embserve serve needs the server extra (pip install 'embserve[server]'): {err}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    try:
        config = load_server_config(args.config).with_overrides(
            {
                "model": args.model,
                "checkpoint": args.checkpoint,
                "seed": args.seed,
                "model_version": args.model_version,
                "engine": args.engine,
                "device": args.device,
                "shard_devices": args.shard_devices,
                "sharding": args.sharding,
                "host": args.host,
                "port": args.port,
                "metrics_port": args.metrics_port,
                "grace_period_s": args.grace_period_s,
                "torch_threads": args.torch_threads,
                "batching.enabled": False if args.no_batching else None,
                "batching.policy": args.batch_policy,
                "batching.max_batch_size": args.max_batch_size,
                "batching.max_queue_delay_us": args.max_queue_delay_us,
                "batching.max_queue_size": args.max_queue_size,
                "batching.max_inflight_batches": args.max_inflight_batches,
                "limits.max_request_examples": args.max_request_examples,
                "limits.max_request_ids": args.max_request_ids,
                "limits.max_message_bytes": args.max_message_bytes,
                "batching.max_queue_wait_ms": args.max_queue_wait_ms,
                "tls.cert_file": args.tls_cert,
                "tls.key_file": args.tls_key,
                "tls.client_ca_file": args.tls_client_ca,
                "auth.tokens_file": args.auth_tokens_file,
            }
        )
        if args.no_metrics:
            config = config.model_copy(update={"metrics_port": None})
    except ValueError as err:
        print(f"embserve serve: invalid configuration: {err}", file=sys.stderr)
        return 2
    try:
        if args.workers > 1:
            return run_workers(config, args.workers)
        run_server(config)
    except SelfCheckFailed as err:
        print(f"embserve serve: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embserve", description="gRPC batched feature server for embedding tables")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_args(sub.add_parser("serve", help="run the server"))
    from embserve.client.cli import add_query_args, run_query

    add_query_args(sub.add_parser("query", help="call a running server and print the result"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return int(run_query(args))


if __name__ == "__main__":
    sys.exit(main())
