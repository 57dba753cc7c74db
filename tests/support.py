"""What the tests share: small model configs and their float weights, an in-process server on a free port, and a
raw HTTP/2 client (for peers that a grpc client cannot play: one that never reads, one that never sends)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from embserve.embeddings import (
    LargeEmbeddings,
    ModelConfig,
    ServingModel,
    init_weights,
    model_config_from_dict,
    table_weights,
)

__all__ = [
    "SMALL_TABLES",
    "ServerHandle",
    "call_headers",
    "ended_streams",
    "float_tables",
    "frame",
    "grpc_message",
    "make_config",
    "raw_connection",
    "send_call",
    "start_server",
    "wait_until",
    "write_model_config",
]

SMALL_TABLES: list[dict[str, Any]] = [
    {"name": "user", "num_embeddings": 1000, "embedding_dim": 16},
    {"name": "author", "num_embeddings": 500, "embedding_dim": 8, "data_type": "fp16"},
    {"name": "hashtags", "num_embeddings": 300, "embedding_dim": 12, "weighted": True},
    {"name": "topics", "num_embeddings": 200, "embedding_dim": 4, "id_policy": "hash"},
]


def make_config(tables: list[dict[str, Any]] | None = None, name: str = "small") -> ModelConfig:
    return model_config_from_dict({"name": name, "tables": tables or SMALL_TABLES})


def write_model_config(config: ModelConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return path


def float_tables(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The tables' weights as float32 numpy arrays, from the same deterministic init the server uses."""
    model = LargeEmbeddings(config)
    init_weights(model, seed)
    return {k: v.detach().float().numpy().copy() for k, v in table_weights(model).items()}


class ServerHandle:
    """A real embserve server running on its own event loop in a background thread."""

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.server = server
        self.loop = loop
        self.thread = thread

    @property
    def address(self) -> str:
        return str(self.server.address)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return float(self.server.metrics.value(name, labels))

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if self.thread.is_alive():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)


def start_server(config: Any, model: ServingModel | None = None) -> ServerHandle:
    from embserve.server.app import EmbserveServer

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            try:
                server = EmbserveServer(config, model=model)
                await server.start()
                box["server"] = server
            except BaseException as err:  # surfaced to the test below
                box["error"] = err
            ready.set()

        loop.run_until_complete(boot())
        if "server" in box:
            loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name="embserve-test-server", daemon=True)
    thread.start()
    ready.wait(120)
    if "error" in box:
        raise box["error"]
    return ServerHandle(box["server"], loop, thread)


# Raw HTTP/2: a client whose stream window is 0 reads nothing; the grpc client would read.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind: int, flags: int, payload: bytes, stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(name: bytes, value: bytes) -> bytes:
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value  # HPACK literal, not indexed


def call_headers(path: str, *, gzip_encoded: bool = False) -> bytes:
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"x"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    if gzip_encoded:
        fields.append((b"grpc-encoding", b"gzip"))
    return b"".join(literal(n, v) for n, v in fields)


def raw_connection(address: str, window: int) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(PREFACE + frame(SETTINGS, 0, struct.pack(">HI", 0x4, window)))  # INITIAL_WINDOW_SIZE
    return sock


def ended_streams(sock: socket.socket, streams: int, timeout: float) -> set[int]:
    """Streams the server ended with a trailers-only HEADERS frame (refused calls), read for up to `timeout`
    or until `streams` have ended; SETTINGS acknowledged."""
    ended: set[int] = set()
    buffer = b""
    deadline = time.monotonic() + timeout
    while len(ended) < streams and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            buffer = buffer[9 + length :]
            if kind == SETTINGS and not flags & ACK:
                sock.sendall(frame(SETTINGS, ACK, b""))
            if kind == HEADERS and flags & END_STREAM:
                ended.add(stream)
    return ended


def grpc_message(body: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(body)) + body


def send_call(sock: socket.socket, stream: int, path: str, body: bytes, *, end: bool = True) -> None:
    """Opens call `stream` on a raw connection and sends its one message, in DATA frames of at most 16 KiB
    (HTTP/2's default largest frame). The message must fit the server's flow-control window (64 KiB at first)."""
    sock.sendall(frame(HEADERS, END_HEADERS, call_headers(path), stream))
    message = grpc_message(body)
    chunks = [message[i : i + (1 << 14)] for i in range(0, len(message), 1 << 14)] or [b""]
    for i, chunk in enumerate(chunks):
        sock.sendall(frame(DATA, END_STREAM if end and i == len(chunks) - 1 else 0, chunk, stream))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "the condition") -> None:
    """Polls `predicate` until it holds; fails the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.01)
