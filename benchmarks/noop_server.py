"""The transport ceiling: a gRPC server with embserve's protocol that parses each request and answers a prebuilt
response of the right size, computing nothing; over unary Lookup calls, over LookupStream messages (each
answered at once, in order, with its request id) and over the Open Inference Protocol's ModelInfer.

    python -m embserve.benchmarks.noop_server --port 0 --output-dim 1664
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator

import grpc

from embserve.oip import wire as oip
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import DEFAULT_MAX_MESSAGE_BYTES, SERVICE_NAME, OutputDType

__all__ = ["main"]


class _Noop:
    def __init__(self, output_dim: int) -> None:
        self.output_dim = output_dim
        self._cache: dict[tuple[int, int], bytes] = {}
        self._infer_cache: dict[int, bytes] = {}

    async def lookup(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._answer(pb.LookupRequest.FromString(raw))

    async def lookup_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async for raw in requests:
            request = pb.LookupRequest.FromString(raw)
            rid = pb.LookupResponse(request_id=request.request_id).SerializeToString()
            await context.write(self._answer(request) + rid)  # concatenated serializations parse as one message

    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = oip.ModelInferRequest.FromString(raw)
        batch = next((int(t.shape[0]) for t in request.inputs if t.name.endswith("__lengths")), 0)
        response = self._infer_cache.get(batch)
        if response is None:
            output = oip.ModelInferResponse.InferOutputTensor(
                name=oip.OUTPUT_NAME, datatype="FP32", shape=[batch, self.output_dim]
            )
            response = oip.ModelInferResponse(
                model_name="noop", outputs=[output], raw_output_contents=[bytes(batch * self.output_dim * 4)]
            ).SerializeToString()
            self._infer_cache[batch] = response
        return response

    def _answer(self, request: pb.LookupRequest) -> bytes:
        key = (request.features.batch_size, request.output_dtype)
        response = self._cache.get(key)
        if response is None:
            batch, wire = key
            dtype = OutputDType.of_wire(wire) or OutputDType.FLOAT32
            response = pb.LookupResponse(
                dtype=dtype.wire,
                shape=[batch, self.output_dim],
                embeddings=bytes(batch * self.output_dim * dtype.itemsize),
                model_name="noop",
                model_version="noop",
            ).SerializeToString()
            self._cache[key] = response
        return response


async def _serve(port: int, output_dim: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES)])
    noop = _Noop(output_dim)
    handlers = {
        "Lookup": grpc.unary_unary_rpc_method_handler(noop.lookup),
        "LookupStream": grpc.stream_stream_rpc_method_handler(noop.lookup_stream),
    }
    infer = {"ModelInfer": grpc.unary_unary_rpc_method_handler(noop.model_infer)}
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),
            grpc.method_handlers_generic_handler(oip.SERVICE_NAME, infer),
        )
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"msg": "serving", "address": f"127.0.0.1:{bound}"}), file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--output-dim", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.output_dim))


if __name__ == "__main__":
    main()
