"""Results -> wire: one request's rows of a batch output, framed as a serialized LookupResponse.

Runs on the executor thread, after the forward; the rows are copied once, from the output tensor into the
response bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import OutputDType, varint

__all__ = ["ResponseEncoder", "field_header", "rows_as_bytes", "rows_in"]


def field_header(number: int, size: int) -> bytes:
    """The tag and length that precede a length-delimited protobuf field of `size` bytes."""
    return varint(number << 3 | 2) + varint(size)


def _field_tag(name: str) -> bytes:
    """The tag of a length-delimited LookupResponse field (packed repeated, bytes or string)."""
    return varint(pb.LookupResponse.DESCRIPTOR.fields_by_name[name].number << 3 | 2)


_SHAPE, _EMBEDDINGS, _REQUEST_ID = _field_tag("shape"), _field_tag("embeddings"), _field_tag("request_id")


class ResponseEncoder:
    """Serializes the LookupResponses of one model version.

    The fields every response shares (dtype, key layout, model name and version) are serialized once per output
    dtype; each response appends its shape, request id and embedding bytes. Protobuf parses concatenated
    serializations as one message, so the result is an ordinary LookupResponse, built without copying the
    embeddings into a message object first. The embedding bytes always come last (see `rows_in`).
    """

    def __init__(
        self, *, keys: Sequence[str], dims: Sequence[int], offsets: Sequence[int], model_name: str, model_version: str
    ) -> None:
        self.output_dim = int(offsets[-1])
        self._prefix = {
            dtype: pb.LookupResponse(
                dtype=dtype.wire,
                keys=keys,
                dims=dims,
                offsets=offsets,
                model_name=model_name,
                model_version=model_version,
            ).SerializeToString()
            for dtype in OutputDType
        }

    def encode(
        self, payload: bytes | memoryview, *, batch_size: int, output_dtype: OutputDType, request_id: str = ""
    ) -> bytes:
        """A serialized LookupResponse around one request's rows, already `output_dtype` bytes (any contiguous
        buffer: the rows are copied once, into the response)."""
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        shape = varint(batch_size) + varint(self.output_dim)
        parts: list[bytes | memoryview] = [self._prefix[output_dtype], _SHAPE, varint(len(shape)), shape]
        if request_id:
            rid = request_id.encode()
            parts += [_REQUEST_ID, varint(len(rid)), rid]
        parts += [_EMBEDDINGS, varint(size), payload]
        return b"".join(parts)


def rows_in(response: bytes, nbytes: int) -> memoryview:
    """The embedding bytes of a response `ResponseEncoder.encode` framed (`nbytes` of them), as a view: no copy."""
    return memoryview(response)[len(response) - nbytes :]


def rows_as_bytes(rows: torch.Tensor, dtype: OutputDType) -> memoryview:
    """float32 rows as a contiguous buffer of `dtype`, correctly rounded (no copy for float32 rows of a contiguous
    output); bfloat16 as its raw 16-bit patterns."""
    if dtype == OutputDType.FLOAT16:
        rows = rows.to(torch.float16)
    elif dtype == OutputDType.BFLOAT16:
        rows = rows.to(torch.bfloat16).view(torch.int16)
    array: Any = rows.contiguous().numpy()
    return memoryview(array).cast("B")
