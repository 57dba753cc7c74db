"""The generated stubs are fresh, and both ends of the protocol agree on every field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from embserve.client import LookupResult, to_sparse_input
from embserve.server.decode import decode_lookup
from embserve.server.framing import ResponseEncoder
from embserve.server.request import ModelSchema
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import OutputDType

ROOT = Path(__file__).resolve().parents[1]
OIP_PROTO = "embserve/oip/grpc_predict_v2.proto"
OIP_DESCRIPTORS = "embserve/oip/grpc_predict_v2.binpb"
GENERATED = [f"embserve/v1/{name}" for name in ("embserve_pb2.py", "embserve_pb2.pyi", "embserve_pb2_grpc.py")] + [
    f"embserve/oip/{name}"
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")
]


def _protoc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), *args], check=True)


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    _protoc(
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        str(ROOT / "protos/embserve/v1/embserve.proto"),
        str(ROOT / "protos" / OIP_PROTO),
    )
    _protoc(f"--descriptor_set_out={tmp_path / OIP_DESCRIPTORS}", str(ROOT / "protos" / OIP_PROTO))
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `make protos`"
    fresh_set = (tmp_path / OIP_DESCRIPTORS).read_bytes()
    assert fresh_set == (ROOT / "protos" / OIP_DESCRIPTORS).read_bytes(), (
        f"protos/{OIP_DESCRIPTORS} is stale: run `make protos`"
    )


def _schema() -> ModelSchema:
    return ModelSchema(
        keys=("a", "b", "c"),
        num_embeddings=np.array([100, 50, 10]),
        hashed=np.array([False, False, True]),
        weighted=np.array([False, True, False]),
        max_request_examples=1000,
        max_request_ids=10_000,
    )


def test_request_round_trip_through_the_wire() -> None:
    features = {"b": [[1, 2], [], [49]], "a": [[0], [99, 98, 97], []]}
    weights = {"b": [[0.5, 2.0], [], [1.5]]}
    sent = to_sparse_input(features, weights=weights).to_proto("float16", request_id="r1")
    decoded = decode_lookup(pb.LookupRequest.FromString(sent.SerializeToString()), _schema())
    assert decoded.batch_size == 3 and decoded.request_id == "r1" and decoded.output_dtype == "float16"
    np.testing.assert_array_equal(decoded.key_index, [1, 0])
    np.testing.assert_array_equal(decoded.lengths, [[2, 0, 1], [1, 3, 0]])
    np.testing.assert_array_equal(decoded.values, [1, 2, 49, 0, 99, 98, 97])
    assert decoded.weights is not None
    np.testing.assert_array_equal(decoded.weights, [0.5, 2.0, 1.5, 1, 1, 1, 1])


def test_response_round_trip_every_dtype() -> None:
    rows = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    payloads = {
        "float32": rows.tobytes(),
        "float16": rows.astype(np.float16).tobytes(),
        # bfloat16: the top 16 bits of the float32 pattern (truncation here; the server rounds).
        "bfloat16": (rows.view(np.uint32) >> 16).astype(np.uint16).tobytes(),
    }
    encoder = ResponseEncoder(keys=["a", "b"], dims=[3, 1], offsets=[0, 3, 4], model_name="m", model_version="v7")
    for dtype, payload in payloads.items():
        for request_id in ("", "req-\u00e9" * 40):
            raw = encoder.encode(payload, batch_size=3, output_dtype=OutputDType(dtype), request_id=request_id)
            msg = pb.LookupResponse.FromString(raw)
            assert msg.request_id == request_id and list(msg.shape) == [3, 4]
            assert list(msg.dims) == [3, 1] and list(msg.offsets) == [0, 3, 4]
        result = LookupResult.from_proto(msg)
        assert result.dtype == dtype and result.model_version == "v7" and result.keys == ("a", "b")
        tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
        np.testing.assert_allclose(result.embeddings.astype(np.float32), rows, atol=tol * 2)
        np.testing.assert_allclose(result["b"].astype(np.float32), rows[:, 3:4], atol=tol * 2)
        assert result["a"].shape == (3, 3)
