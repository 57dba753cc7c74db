"""The general-purpose baseline of the CPU benchmark: the same model served by Ray Serve, unary `Lookup` over Ray
Serve's direct gRPC ingress (the replica serves gRPC itself, no proxy) with `@serve.batch`.

The replica does what embserve's forward thread does, with embserve's own code, so that the comparison is of the
serving machinery and not of the model: each request is checked against the model (`decode_lookup`), a batch is
assembled and run (`BatchExecutor.run_blocking`: one KeyedJaggedTensor, one forward, split per request), and each
answer is returned as a `LookupResponse`. Ray is not part of embserve's stack: run this with a Python that has Ray
Serve and embserve installed (`make bench-ray` makes one, `.venv-ray`).

    RAY_SERVE_ENABLE_DIRECT_INGRESS=1 .venv-ray/bin/python -m embserve.benchmarks.ray_server --model small.yaml

It logs one JSON line `{"msg": "serving", "address": ...}` on stderr once a Lookup is answered, and shuts Ray down
on SIGTERM. Every process it starts (Ray's GCS, raylet, the replica) is below it, so the CPU benchmark reads their
CPU from its process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import LOOKUP_METHOD

__all__ = ["main"]

SERVICER = "embserve.v1.embserve_pb2_grpc.add_EmbeddingServiceServicer_to_server"
APP = "embserve"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deployment(max_batch_size: int, batch_wait_s: float, max_ongoing: int) -> Any:
    from ray import serve  # imported here: this module is linted and imported without Ray

    @serve.deployment(
        max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": 1},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},  # no log line per request
    )
    class EmbeddingLookup:
        def __init__(self, model_yaml: str, torch_threads: int) -> None:
            import torch

            from embserve.embeddings import build_serving_model, model_config_from_dict
            from embserve.server.config import LimitsConfig
            from embserve.server.executor import BatchExecutor
            from embserve.server.request import ModelSchema

            torch.set_num_threads(torch_threads)
            model = build_serving_model(model_config_from_dict(yaml.safe_load(model_yaml)), seed=0)
            self.executor = BatchExecutor(model, pipelined=False)
            limits = LimitsConfig()  # embserve's default request limits
            self.schema = ModelSchema.of(
                model,
                max_request_examples=limits.max_request_examples,
                max_request_ids=limits.max_request_ids,
            )

        async def Lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
            answer = await self.batched(request)
            if isinstance(answer, Exception):  # this request was refused; its batch neighbours were answered
                raise answer
            return answer  # type: ignore[no-any-return]

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def batched(self, requests: list[pb.LookupRequest]) -> list[pb.LookupResponse | Exception]:
            from embserve.server.decode import decode_lookup
            from embserve.server.errors import InvalidRequest

            answers: list[pb.LookupResponse | Exception] = []
            valid = []
            for r in requests:
                try:
                    valid.append(decode_lookup(r, self.schema))
                    answers.append(pb.LookupResponse())  # its place, filled below
                except InvalidRequest as err:
                    answers.append(err)
            outputs = iter(self.executor.run_blocking(valid) if valid else [])
            return [
                a if isinstance(a, Exception) else pb.LookupResponse.FromString(next(outputs).response) for a in answers
            ]

    return EmbeddingLookup


def _wait_answered(address: str, timeout_s: float) -> None:
    request = pb.LookupRequest(request_id="ready").SerializeToString()
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(LOOKUP_METHOD)
        while True:
            try:
                call(request, timeout=5)
                return
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return  # answered by the replica (a request without features is refused): serving
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray Serve did not answer Lookup on {address}: {err.details()}") from None
                time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model YAML (initialised from seed 0, as `serve` does)")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: a free one)")
    parser.add_argument("--max-batch-size", type=int, default=256, help="@serve.batch max_batch_size (requests)")
    parser.add_argument("--batch-wait-ms", type=float, default=1.0, help="@serve.batch batch_wait_timeout_s, in ms")
    parser.add_argument("--max-ongoing", type=int, default=1024, help="the deployment's max_ongoing_requests")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may schedule on")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads in the replica")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    port = args.port or _free_port()
    # The replica's own gRPC server takes `port` (direct ingress); Serve's proxy, which still starts, gets another
    # one, so that no call goes through it.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", str(port))
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT", str(port + 1))
    proxy_port = _free_port()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="warning", log_to_driver=False)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(grpc_options=gRPCOptions(port=proxy_port, grpc_servicer_functions=[SERVICER]))
        lookup = _deployment(args.max_batch_size, args.batch_wait_ms / 1e3, args.max_ongoing)
        serve.run(lookup.bind(Path(args.model).read_text(), args.torch_threads), name=APP, blocking=False)
        address = f"127.0.0.1:{port}"
        _wait_answered(address, 300)
        print(json.dumps({"msg": "serving", "address": address, "server": "ray"}), file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
