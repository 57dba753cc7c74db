"""Why the protocol sends ids as packed little-endian bytes: decode cost of `bytes` + `np.frombuffer` against a
packed `repeated int64` field, for the id counts of typical requests.

    python -m embserve.benchmarks.wire_encoding
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["main"]


def _messages() -> tuple[Any, Any]:
    """Two one-field messages built at run time: `repeated int64 values = 1` (packed) and `bytes values = 1`."""
    fdp = descriptor_pb2.FileDescriptorProto(name="wire_bench.proto", package="wire_bench", syntax="proto3")
    for name, ftype, label in (
        ("Packed", descriptor_pb2.FieldDescriptorProto.TYPE_INT64, descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED),
        ("Raw", descriptor_pb2.FieldDescriptorProto.TYPE_BYTES, descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL),
    ):
        msg = fdp.message_type.add(name=name)
        msg.field.add(name="values", number=1, type=ftype, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("wire_bench.Packed")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("wire_bench.Raw")),
    )


def _time(fn: object, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / repeat


def main() -> None:
    packed_cls, raw_cls = _messages()
    rng = np.random.default_rng(0)
    print(
        f"{'ids':>9} | {'packed: parse+np.array':>22} | {'bytes: parse+frombuffer':>23} | {'wire packed':>11} | {'wire bytes':>10}"
    )
    for n in (26, 208, 13_312, 102_400):
        ids = rng.integers(0, 10**6, size=n, dtype=np.int64)
        packed = packed_cls(values=ids.tolist()).SerializeToString()
        raw = raw_cls(values=ids.tobytes()).SerializeToString()
        repeat = max(20, 200_000 // n)
        t_packed = _time(lambda: np.array(packed_cls.FromString(packed).values, dtype=np.int64), repeat)
        t_raw = _time(lambda: np.frombuffer(raw_cls.FromString(raw).values, dtype="<i8"), repeat)
        print(f"{n:>9,} | {t_packed * 1e6:>19.1f} us | {t_raw * 1e6:>20.1f} us | {len(packed):>11,} | {len(raw):>10,}")


if __name__ == "__main__":
    main()
