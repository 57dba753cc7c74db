"""A router's long-lived channels to its shard servers: replicas used round-robin, each checked to serve the plan.

Each replica's GetModelMetadata is read before its first call, again every `plan_check_interval`, and after any
call to it fails (a restarted shard may serve another plan). A replica that reports another plan digest or shard
index fails the call with FAILED_PRECONDITION naming the shard; a replica that cannot be reached is skipped for the
next one of the same shard, and when none answers the call fails UNAVAILABLE naming the shard. Torch-free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from embserve.v1 import embserve_pb2 as pb
from embserve.v1 import embserve_pb2_grpc as pb_grpc

from .errors import DeadlineExpired, EmbserveError, Overloaded, ShardFailed, ShardMismatch, ShardUnavailable

__all__ = ["ShardChannels", "parse_shard_addresses"]


def parse_shard_addresses(addresses: Mapping[int, Sequence[str]], shard_count: int) -> dict[int, list[str]]:
    """Checks that every shard of the plan has at least one address and none is outside it (`ValueError`)."""
    for index in addresses:
        if not 0 <= index < shard_count:
            raise ValueError(f"--shard-address {index}=...: the plan has shards 0 to {shard_count - 1}")
    missing = [i for i in range(shard_count) if not addresses.get(i)]
    if missing:
        raise ValueError(f"shard {missing[0]} has no address: give --shard-address {missing[0]}=HOST:PORT")
    return {i: list(addresses[i]) for i in range(shard_count)}


@dataclasses.dataclass
class _Replica:
    shard: int
    address: str
    channel: grpc.aio.Channel
    stub: Any
    checked_at: float = -1e18
    version: str = ""
    checking: asyncio.Task[None] | None = None


class ShardChannels:
    """Channels to every replica of every shard.

    Args:
        addresses: each shard's replica addresses.
        plan_digest: the digest the shards must report.
        credentials: channel credentials (TLS), or None for plaintext.
        token: bearer token sent to the shards, or None.
        check_interval_s: how long a replica's plan check holds.
        options: gRPC channel options.
    """

    def __init__(
        self,
        addresses: Mapping[int, Sequence[str]],
        *,
        plan_digest: str,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        check_interval_s: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.plan_digest = plan_digest
        self.check_interval_s = check_interval_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.replicas: dict[int, list[_Replica]] = {}
        for shard, addrs in addresses.items():
            replicas = []
            for address in addrs:
                channel = (
                    grpc.aio.secure_channel(address, credentials, options=list(options))
                    if credentials is not None
                    else grpc.aio.insecure_channel(address, options=list(options))
                )
                stub = pb_grpc.EmbeddingServiceStub(channel)  # type: ignore[no-untyped-call]  # generated, untyped
                replicas.append(_Replica(shard, address, channel, stub))
            self.replicas[shard] = replicas
        self._turn = {shard: itertools.count() for shard in self.replicas}

    def versions(self) -> dict[int, str]:
        """The version each shard reported at its last check (its first replica's that has answered)."""
        return {s: next((r.version for r in rs if r.version), "") for s, rs in self.replicas.items()}

    async def lookup(self, shard: int, request: pb.LookupRequest, deadline: float) -> pb.LookupResponse:
        """Shard `shard`'s answer to a LookupRequest, from the next replica that answers before
        `deadline` (a `time.monotonic()` time)."""
        replicas = self.replicas[shard]
        first = next(self._turn[shard])
        failure: EmbserveError | None = None
        for i in range(len(replicas)):
            replica = replicas[(first + i) % len(replicas)]
            try:
                await self._check(replica, deadline)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExpired(f"shard {shard} ({replica.address}): the deadline passed before it answered")
                response: pb.LookupResponse = await replica.stub.Lookup(
                    request, timeout=remaining, metadata=self._metadata
                )
                return response
            except grpc.aio.AioRpcError as err:
                replica.checked_at = -1e18  # read its plan again before the next call
                failure = _error_of(err, replica)
            except ShardUnavailable as err:
                failure = err
            if not isinstance(failure, ShardUnavailable):
                raise failure
        assert failure is not None
        raise failure

    async def _check(self, replica: _Replica, deadline: float) -> None:
        if time.monotonic() - replica.checked_at < self.check_interval_s:
            return
        if replica.checking is None or replica.checking.done():
            replica.checking = asyncio.get_running_loop().create_task(self._read_plan(replica, deadline))
        await asyncio.shield(replica.checking)

    async def _read_plan(self, replica: _Replica, deadline: float) -> None:
        try:
            meta: pb.ModelMetadata = await replica.stub.GetModelMetadata(
                pb.GetModelMetadataRequest(),
                timeout=max(0.001, deadline - time.monotonic()),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            raise _error_of(err, replica) from None
        if meta.plan_digest != self.plan_digest or meta.shard_count == 0 or meta.shard_index != replica.shard:
            said = f"plan {meta.plan_digest or '(none)'} shard {meta.shard_index if meta.shard_count else '(none)'}"
            raise ShardMismatch(
                f"shard {replica.shard} ({replica.address}) serves {said}; the router's plan is {self.plan_digest}"
            )
        replica.version = meta.version
        replica.checked_at = time.monotonic()

    async def close(self) -> None:
        for replicas in self.replicas.values():
            for r in replicas:
                await r.channel.close()


def _error_of(err: grpc.aio.AioRpcError, replica: _Replica) -> EmbserveError:
    code, where = err.code(), f"shard {replica.shard} ({replica.address})"
    details = " ".join((err.details() or "").split())
    if code is grpc.StatusCode.UNAVAILABLE:
        return ShardUnavailable(f"{where} is unavailable: {details}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExpired(f"{where} did not answer within the deadline")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"{where}: {details}")
    return ShardFailed(f"{where}: {code.name}: {details}", code)
