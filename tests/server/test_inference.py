"""The Open Inference Protocol on a real server, called with the real Triton client (tritonclient[grpc]).

The Triton client and the server share this process: its `inference.*` messages live in protobuf's default pool,
the server's in a pool of their own (embserve.oip.wire), so this module also proves that the two coexist.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from embserve.embeddings import ModelConfig, ServingModel
from embserve.oip import wire as oip
from embserve.server.decode_oip import check_infer_wire
from embserve.server.errors import InvalidRequest
from embserve.v1 import embserve_pb2 as pb
from tests.reference import pool, random_features
from tests.server.helpers import lookup_request, stub, wrapped
from tests.support import ServerHandle

Factory = Callable[..., ServerHandle]
Features = tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]
WEIGHTED = {"hashtags"}
DTYPES = {"FP32": pb.DTYPE_FLOAT32, "FP16": pb.DTYPE_FLOAT16, "BF16": pb.DTYPE_BFLOAT16}


@pytest.fixture
def served(server_factory: Factory, small_serving: ServingModel) -> ServerHandle:
    return server_factory(small_serving)


@pytest.fixture
def client(served: ServerHandle) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(served.address) as c:
        yield c


def _per_key(
    keys: list[str], lengths: np.ndarray, values: np.ndarray, weights: np.ndarray | None
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """(key, lengths, values, weights or None) of each key of KJT-layout features; weights only for weighted keys."""
    starts = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))]).astype(np.int64)
    for k, key in enumerate(keys):
        s, e = starts[k], starts[k + 1]
        w = weights[s:e] if weights is not None and key in WEIGHTED else None
        yield key, lengths[k], values[s:e], w


def triton_inputs(
    keys: list[str], lengths: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None
) -> list[triton.InferInput]:
    inputs = []
    for key, key_lengths, key_values, key_weights in _per_key(keys, lengths, values, weights):
        arrays: list[tuple[str, np.ndarray, str]] = [
            ("lengths", key_lengths.astype(np.int32), "INT32"),
            ("values", key_values.astype(np.int64), "INT64"),
        ]
        if key_weights is not None:
            arrays.append(("weights", key_weights.astype(np.float32), "FP32"))
        for kind, array, datatype in arrays:
            tensor = triton.InferInput(f"{key}__{kind}", list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
    return inputs


def typed_request(
    keys: list[str], lengths: np.ndarray, values: np.ndarray, weights: np.ndarray | None, **fields: Any
) -> service_pb2.ModelInferRequest:
    """A request with the typed `contents` fields instead of raw bytes, built with Triton's own messages."""
    request = service_pb2.ModelInferRequest(model_name="small", **fields)
    for key, key_lengths, key_values, key_weights in _per_key(keys, lengths, values, weights):
        tensor = request.inputs.add(name=f"{key}__lengths", datatype="INT32", shape=[key_lengths.size])
        tensor.contents.int_contents.extend(key_lengths.tolist())
        tensor = request.inputs.add(name=f"{key}__values", datatype="INT64", shape=[key_values.size])
        tensor.contents.int64_contents.extend(key_values.tolist())
        if key_weights is not None:
            tensor = request.inputs.add(name=f"{key}__weights", datatype="FP32", shape=[key_weights.size])
            tensor.contents.fp32_contents.extend(key_weights.tolist())
    return request


def random_request(rng: np.random.Generator, config: ModelConfig) -> Features:
    """Any subset of the keys in any order, empty bags, weights on the weighted table, ids past the end of the
    hashed table."""
    rows = {t.name: t.num_embeddings for t in config.tables}
    keys = list(rng.permutation(list(rows))[: rng.integers(1, len(rows) + 1)])
    rows["topics"] *= 3
    keys, lengths, values, _ = random_features(rng, rows, int(rng.integers(1, 30)), keys=keys, max_len=20)
    weights = None
    if "hashtags" in keys:
        key_of = np.repeat(np.array(keys), lengths.sum(axis=1))
        weights = np.where(key_of == "hashtags", rng.uniform(0.1, 3.0, values.size), 1.0).astype(np.float32)
    return keys, lengths, values, weights


def test_metadata_lists_inputs_and_output(client: triton.InferenceServerClient, small_serving: ServingModel) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("small") and client.is_model_ready("small", small_serving.version)
    assert not client.is_model_ready("other") and not client.is_model_ready("small", "v-none")
    server = client.get_server_metadata()
    assert server.name == "embserve" and server.version
    meta = client.get_model_metadata("small")
    assert meta.name == "small" and list(meta.versions) == [small_serving.version] and meta.platform == "torchrec"
    inputs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    assert inputs == [
        ("user__lengths", "INT32", [-1]),
        ("user__values", "INT64", [-1]),
        ("author__lengths", "INT32", [-1]),
        ("author__values", "INT64", [-1]),
        ("topics__lengths", "INT32", [-1]),
        ("topics__values", "INT64", [-1]),
        ("hashtags__lengths", "INT32", [-1]),
        ("hashtags__values", "INT64", [-1]),
        ("hashtags__weights", "FP32", [-1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("embeddings", "FP32", [-1, 40])]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("other")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "'other' is not found" in info.value.message()


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
def test_infer_equals_lookup_bit_for_bit(
    served: ServerHandle,
    client: triton.InferenceServerClient,
    small_config: ModelConfig,
    small_serving: ServingModel,
    datatype: str,
) -> None:
    rng = np.random.default_rng(7)
    calls = [random_request(rng, small_config) for _ in range(24)]
    params = {} if datatype == "FP32" else {"output_datatype": datatype}
    channel, s = stub(served.address)
    with channel, concurrent.futures.ThreadPoolExecutor(8) as pool:  # calls of both APIs share batches
        lookups = [s.Lookup.future(lookup_request(*c, dtype=DTYPES[datatype])) for c in calls]
        infers = [
            pool.submit(client.infer, "small", triton_inputs(*c), request_id=f"r{i}", parameters=params)
            for i, c in enumerate(calls)
        ]
        for i, (call, lookup, infer) in enumerate(zip(calls, lookups, infers)):
            native, result = lookup.result(timeout=60), infer.result(timeout=60)
            response = result.get_response()
            assert response.model_name == "small" and response.model_version == small_serving.version
            assert response.id == f"r{i}"
            (output,) = response.outputs
            assert (output.name, output.datatype, list(output.shape)) == ("embeddings", datatype, list(native.shape))
            assert response.raw_output_contents[0] == native.embeddings  # bit for bit
    assert served.metric("embserve_requests_total", {"method": "ModelInfer", "code": "OK"}) == len(calls)
    if datatype == "FP16":  # what a Triton user reads: the correctly rounded fp32 result
        exact = client.infer("small", triton_inputs(*calls[0])).as_numpy("embeddings")
        half = client.infer("small", triton_inputs(*calls[0]), parameters=params).as_numpy("embeddings")
        assert half.dtype == np.float16 and np.array_equal(half, exact.astype(np.float16))


def test_weights_left_out_are_ones(
    client: triton.InferenceServerClient, small_serving: ServingModel, small_tables: dict[str, np.ndarray]
) -> None:
    # `hashtags` is weighted; a request without `hashtags__weights` pools its ids with weight 1.0.
    lengths = np.array([[2, 0, 3]], np.int32)
    values = np.array([4, 9, 9, 1, 250], np.int64)
    without = client.infer("small", triton_inputs(["hashtags"], lengths, values)).as_numpy("embeddings")
    ones = np.ones(values.size, np.float32)
    expected = pool(small_tables, ["hashtags"], lengths, values, ones, small_serving.keys)
    np.testing.assert_allclose(without, expected, rtol=1e-6, atol=1e-7)
    explicit = client.infer("small", triton_inputs(["hashtags"], lengths, values, ones)).as_numpy("embeddings")
    assert np.array_equal(without, explicit)
    doubled = client.infer("small", triton_inputs(["hashtags"], lengths, values, 2 * ones)).as_numpy("embeddings")
    assert not np.array_equal(without, doubled)  # the weights are read when they are sent


def test_typed_contents_and_output_parameter(
    served: ServerHandle, client: triton.InferenceServerClient, small_config: ModelConfig
) -> None:
    rng = np.random.default_rng(3)
    call = random_request(rng, small_config)
    while "hashtags" not in call[0]:
        call = random_request(rng, small_config)
    raw = client.infer("small", triton_inputs(*call)).get_response()
    channel = grpc.insecure_channel(served.address)
    with channel:
        triton_stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = triton_stub.ModelInfer(typed_request(*call), timeout=30)
        assert typed.raw_output_contents == raw.raw_output_contents
        request = typed_request(
            *call,
            outputs=[
                service_pb2.ModelInferRequest.InferRequestedOutputTensor(
                    name="embeddings", parameters={"datatype": service_pb2.InferParameter(string_param="FP16")}
                )
            ],
        )
        half = triton_stub.ModelInfer(request, timeout=30)
    exact = np.frombuffer(raw.raw_output_contents[0], "<f4")
    assert half.outputs[0].datatype == "FP16"
    assert np.array_equal(np.frombuffer(half.raw_output_contents[0], "<f2"), exact.astype(np.float16))


def _tensor(name: str, datatype: str, array: Any) -> triton.InferInput:
    array = np.asarray(array, dtype={"INT32": np.int32, "INT64": np.int64, "FP32": np.float32}[datatype])
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


USER = [_tensor("user__lengths", "INT32", [1, 2]), _tensor("user__values", "INT64", [1, 2, 3])]
BAD_INPUTS: list[tuple[list[triton.InferInput], str]] = [
    (
        [_tensor("user__lengths", "INT64", [1, 2]), USER[1]],
        "input 'user__lengths' has datatype 'INT64', but model 'small' expects INT32",
    ),
    ([_tensor("user__lengths", "INT32", [[1, 2]]), USER[1]], r"input 'user__lengths' has shape \[1, 2\]"),
    ([*USER, _tensor("bogus__values", "INT64", [1])], "unexpected inference input 'bogus__values'"),
    ([*USER, _tensor("user__ids", "INT64", [1])], "unexpected inference input 'user__ids'"),
    ([USER[1]], "input 'user__values' needs the input 'user__lengths'"),
    (
        [*USER, _tensor("author__lengths", "INT32", [0, 0, 0])],
        r"input 'author__lengths' has shape \[3\] but 'user__lengths' has \[2\]",
    ),
    (
        [USER[0], _tensor("user__values", "INT64", [1, 2])],
        r"input 'user__values' has 2 ids but sum\(user__lengths\) = 3",
    ),
    (
        [USER[0], _tensor("user__values", "INT64", [1, 1000, 3])],
        r"id 1000 at user__values\[1\] is out of range for key 'user'",
    ),
    (
        [*USER, _tensor("author__lengths", "INT32", [0, 1]), _tensor("author__values", "INT64", [-4])],
        r"negative id -4 at author__values\[0\]",
    ),
    ([_tensor("user__lengths", "INT32", [-1, 4]), USER[1]], r"negative length -1 at user__lengths\[0\]"),
    ([*USER, _tensor("user__weights", "FP32", [1, 1, 1])], "table 'user' is not weighted"),
    (
        [
            *USER,
            _tensor("hashtags__lengths", "INT32", [0, 1]),
            _tensor("hashtags__values", "INT64", [5]),
            _tensor("hashtags__weights", "FP32", [np.inf]),
        ],
        r"non-finite weight inf at hashtags__weights\[0\]",
    ),
    (
        [
            *USER,
            _tensor("hashtags__lengths", "INT32", [0, 1]),
            _tensor("hashtags__values", "INT64", [5]),
            _tensor("hashtags__weights", "FP32", [1, 2]),
        ],
        "input 'hashtags__weights' has 2 entries but 'hashtags__values' has 1",
    ),
    (
        [_tensor("user__lengths", "INT32", []), _tensor("user__values", "INT64", [])],
        r"batch size \(the shape of the <key>__lengths inputs\) must be > 0",
    ),
    ([], "no inputs"),
]


@pytest.mark.parametrize(("inputs", "message"), BAD_INPUTS)
def test_bad_inputs_name_the_tensor(
    served: ServerHandle, client: triton.InferenceServerClient, inputs: list[triton.InferInput], message: str
) -> None:
    with pytest.raises(InferenceServerException, match=message) as info:
        client.infer("small", inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert served.metric("embserve_requests_total", {"method": "ModelInfer", "code": "INVALID_ARGUMENT"}) == 1


def test_bad_requests_outside_the_tensors(served: ServerHandle, client: triton.InferenceServerClient) -> None:
    cases: list[tuple[Callable[[], Any], str, str]] = [
        (lambda: client.infer("other", USER), "NOT_FOUND", "'other' is not found"),
        (lambda: client.infer("small", USER, model_version="v9"), "NOT_FOUND", "version 'v9' is not found"),
        (
            lambda: client.infer("small", USER, parameters={"output_datatype": "INT8"}),
            "INVALID_ARGUMENT",
            "output datatype 'INT8' is not one of FP32, FP16, BF16",
        ),
        (
            lambda: client.infer("small", USER, outputs=[triton.InferRequestedOutput("scores")]),
            "INVALID_ARGUMENT",
            "unexpected inference output 'scores'",
        ),
    ]
    for call, code, message in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == f"StatusCode.{code}" and message in info.value.message(), info.value
    channel = grpc.insecure_channel(served.address)
    with channel:
        infer = channel.unary_unary(oip.MODEL_INFER_METHOD)
        with pytest.raises(grpc.RpcError) as rpc:
            infer(b"\xff\xff\xff", timeout=10)  # not a ModelInferRequest
        assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        raw = service_pb2.ModelInferRequest(
            model_name="small",
            inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="user__lengths", datatype="INT32", shape=[2])],
            raw_input_contents=[b"\x01\x00\x00\x00"],
        )
        with pytest.raises(grpc.RpcError) as rpc:
            infer(raw.SerializeToString(), timeout=10)
        assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'user__lengths' has 4 bytes of raw contents; shape [2] of INT32 is 8 bytes" in str(
            rpc.value.details()
        )


def test_full_queue_is_unavailable_as_in_triton(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(
        wrapped(small_serving, delay_s=0.5),
        batching={"max_batch_size": 2, "max_queue_size": 2, "max_inflight_batches": 1},
    )
    with triton.InferenceServerClient(handle.address) as c, concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(c.infer, "small", USER) for _ in range(6)]
        codes = []
        for f in futures:
            try:
                f.result(timeout=60)
                codes.append("OK")
            except InferenceServerException as err:
                codes.append(str(err.status()))
    assert "StatusCode.UNAVAILABLE" in codes and "OK" in codes, codes
    assert handle.metric("embserve_requests_total", {"method": "ModelInfer", "code": "UNAVAILABLE"}) >= 1


def test_deadline_passed_in_the_queue(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(
        wrapped(small_serving, delay_s=0.6), batching={"max_batch_size": 2, "max_inflight_batches": 1}
    )
    with triton.InferenceServerClient(handle.address) as c, concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.infer, "small", USER)  # holds the executor for 0.6 s
        time.sleep(0.1)
        with pytest.raises(InferenceServerException) as info:
            c.infer("small", USER, client_timeout=0.2)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert first.result(timeout=30).as_numpy("embeddings").shape == (2, 40)


def test_readiness_follows_drain(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(wrapped(small_serving, delay_s=0.3), batching={"max_inflight_batches": 1})
    with triton.InferenceServerClient(handle.address) as c, concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert c.is_server_ready() and c.is_model_ready("small")
        accepted = pool.submit(c.infer, "small", USER)
        time.sleep(0.1)
        stopper = threading.Thread(target=handle.stop, kwargs={"grace": 10.0})
        stopper.start()
        time.sleep(0.05)
        assert c.is_server_live()
        assert not c.is_server_ready() and not c.is_model_ready("small")
        with pytest.raises(InferenceServerException) as info:
            c.infer("small", USER)
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert accepted.result(timeout=30).as_numpy("embeddings").shape == (2, 40)
        stopper.join(30)


def test_tokens(tmp_path: Path, server_factory: Factory, small_serving: ServingModel) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("all-token *\ninfer-token ModelInfer,ModelMetadata\nlookup-token Lookup\n")
    handle = server_factory(small_serving, auth={"tokens_file": str(tokens)})
    with triton.InferenceServerClient(handle.address) as c:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("small")  # probes need no token
        for token in ("all-token", "infer-token"):
            headers = {"authorization": f"Bearer {token}"}
            assert c.get_model_metadata("small", headers=headers).name == "small"
            assert c.infer("small", USER, headers=headers).as_numpy("embeddings").shape == (2, 40)
        cases = [(None, "UNAUTHENTICATED"), ("wrong", "UNAUTHENTICATED"), ("lookup-token", "PERMISSION_DENIED")]
        for refused, code in cases:
            refused_headers = {"authorization": f"Bearer {refused}"} if refused else None
            with pytest.raises(InferenceServerException) as info:
                c.infer("small", USER, headers=refused_headers)
            assert info.value.status() == f"StatusCode.{code}"
        with pytest.raises(InferenceServerException) as info:
            c.get_server_metadata(headers={"authorization": "Bearer infer-token"})
        assert info.value.status() == "StatusCode.PERMISSION_DENIED" and "ServerMetadata" in info.value.message()
    assert handle.metric("embserve_requests_total", {"method": "ModelInfer", "code": "PERMISSION_DENIED"}) == 1


def test_reflection_lists_the_service(served: ServerHandle) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(served.address)
    with channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"inference.GRPCInferenceService", "embserve.v1.EmbeddingService"} <= set(db.get_services())
        assert db.FindFileContainingSymbol("inference.ModelInferRequest").package == "inference"


def test_large_request_fields_are_counted_before_parsing(served: ServerHandle, small_serving: ServingModel) -> None:
    inputs = [service_pb2.ModelInferRequest.InferInputTensor(name="user__lengths", datatype="INT32", shape=[1])]
    many_inputs = service_pb2.ModelInferRequest(model_name="small", inputs=inputs * 200_000)  # ~4 MB of inputs
    many_contents = service_pb2.ModelInferRequest(model_name="small", raw_input_contents=[b"\0"] * 1_100_000)
    one_input = service_pb2.ModelInferRequest.InferInputTensor(name="user__lengths", datatype="INT32", shape=[1])
    for _ in range(100_000):
        one_input.parameters[f"p{_}"].bool_param = True  # one input with a huge parameters map
    huge_map = service_pb2.ModelInferRequest(model_name="small", inputs=[one_input])
    max_inputs = 3 * len(small_serving.keys)  # at most: lengths, values and weights of every key
    with pytest.raises(InvalidRequest, match=f"more than {max_inputs} inputs"):
        check_infer_wire(many_inputs.SerializeToString(), max_inputs)
    with pytest.raises(InvalidRequest, match="raw_input_contents"):
        check_infer_wire(many_contents.SerializeToString(), max_inputs)
    with pytest.raises(InvalidRequest, match="an input tensor has more than 64 fields"):
        check_infer_wire(huge_map.SerializeToString(), max_inputs)
    check_infer_wire(service_pb2.ModelInferRequest(model_name="small", inputs=inputs).SerializeToString(), max_inputs)
    with grpc.insecure_channel(served.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        infer = channel.unary_unary(oip.MODEL_INFER_METHOD)
        for request, message in (
            (many_inputs, "inputs"),
            (many_contents, "raw_input_contents"),
            (huge_map, "an input tensor"),
        ):
            body = request.SerializeToString()
            assert 1 << 20 <= len(body) < 8 << 20  # large enough to be walked, within the message limit
            with pytest.raises(grpc.RpcError) as rpc:
                infer(body, timeout=30)
            assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert message in str(rpc.value.details())
