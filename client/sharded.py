"""Fan-out without a router: `ShardedClient` and `AsyncShardedClient` call a sharding plan's shard servers
themselves and answer as `embserve route` does.

A request is checked against the whole model (its keys, ids of tables that reject ids past their rows, weights only
on weighted tables), split by shard with `embserve.v1.sharding` (the router's own code), each part sent at once to
its shard (a `Client` per shard: its replicas used round-robin) with what is left of the deadline, and the shards'
float32 answers joined: whole tables' columns copied, row-wise partial sums added in float32, rounded once to the
requested output type. So the answers are the router's, bit for bit.

Before a shard's first call, and again after a call to it fails, the client reads its metadata: a shard that
serves another plan or another shard index fails with FAILED_PRECONDITION, one that cannot be reached with
UNAVAILABLE, every message naming the shard. The model's layout (tables, dims, rows, key order) comes from the
shards' metadata, so the client needs only the plan: no model config, no torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.sharding import PlanPlacement, ShardLayout, ShardPart, shard_version, to_output_bytes
from embserve.v1.wire import DEFAULT_MAX_MESSAGE_BYTES, OutputDType, OutputDTypeName

from ._base import DEFAULT_STREAMS, DEFAULT_TIMEOUT_S, DEFAULT_TRANSPORT, USE_CLIENT_DEFAULT, Timeout
from ._transport import RetryPolicy, TlsConfig
from .aio import AsyncClient
from .errors import DeadlineExceeded, EmbserveError, InvalidRequest, ServerError, Unavailable
from .inputs import Features, SparseInput, Weights, to_sparse_input
from .result import LookupResult, ModelInfo
from .sync import Client

__all__ = ["AsyncShardedClient", "PlanLike", "ShardedClient", "read_plan"]

PlanLike = Any
"""A plan: the path of its YAML file (`embserve plan -o`), its parsed mapping, or a loaded `ShardingPlan`."""

MAX_FANOUT_THREADS = 64

ClientT = TypeVar("ClientT", Client, AsyncClient)


def read_plan(plan: PlanLike) -> PlanPlacement:
    """The placement of `plan` (see `PlanLike`); its stored digest is checked against its content.

    Reading a YAML file needs PyYAML (installed with the server); a client-only install may pass the parsed
    mapping instead.

    Raises:
        ValueError: naming the file and the field at fault.
    """
    if isinstance(plan, Mapping):
        return PlanPlacement.of(plan)
    if hasattr(plan, "model_dump"):
        return PlanPlacement.of(plan.model_dump(mode="json"))
    if not isinstance(plan, (str, os.PathLike)):
        raise ValueError(f"plan must be a file path, a mapping or a ShardingPlan, got {type(plan).__name__}")
    source = str(plan)
    try:
        import yaml
    except ImportError:
        raise ValueError(f"plan {source!r}: reading a plan file needs PyYAML; pass the parsed mapping") from None
    try:
        data = yaml.safe_load(Path(plan).read_text())
    except OSError as err:
        raise ValueError(f"plan {source!r}: cannot read it: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"plan {source!r}: not valid YAML: {' '.join(str(err).split())}") from None
    return PlanPlacement.of(data, source=f"plan {source!r}")


def _shard_addresses(shards: Mapping[int, str | Sequence[str]], count: int) -> dict[int, list[str]]:
    for index in shards:
        if not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"shards: {index!r} is not a shard of the plan (shards 0 to {count - 1})")
    out = {}
    for index in range(count):
        given = shards.get(index)
        addresses = [given] if isinstance(given, str) else list(given or [])
        if not addresses:
            raise ValueError(f"shard {index} has no address: give shards={{{index}: ['HOST:PORT', ...]}}")
        out[index] = addresses
    return out


class _ShardedBase(Generic[ClientT]):
    """The plan, the layout learned from the shards, request checks, split and join; sync and async add I/O."""

    def __init__(
        self,
        plan: PlanLike,
        shards: Mapping[int, str | Sequence[str]],
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = RetryPolicy(),
        tls: TlsConfig | bool | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        transport: str = DEFAULT_TRANSPORT,
        streams: int = DEFAULT_STREAMS,
    ) -> None:
        self.plan = read_plan(plan)
        self.addresses = _shard_addresses(shards, self.plan.shard_count)
        self._default_timeout = timeout
        settings: dict[str, Any] = {
            "timeout": timeout,
            "retry": retry,
            "tls": tls,
            "token": token,
            "max_message_bytes": max_message_bytes,
            "transport": transport,
            "streams": streams,
        }
        self.shards: dict[int, ClientT] = {}
        try:
            for index, addresses in self.addresses.items():
                self.shards[index] = self._open(addresses, settings)
        except BaseException:
            self._close_opened()
            raise
        self._infos: dict[int, ModelInfo] = {}
        self._checked: set[int] = set()
        self._layout: ShardLayout | None = None
        self._model_name = self.plan.model

    def _open(self, addresses: list[str], settings: dict[str, Any]) -> ClientT:
        raise NotImplementedError

    def _close_opened(self) -> None:
        raise NotImplementedError

    def _where(self, shard: int) -> str:
        return f"shard {shard} ({', '.join(self.addresses[shard])})"

    def _deadline(self, timeout: Timeout) -> float | None:
        seconds = self._default_timeout if timeout is USE_CLIENT_DEFAULT else timeout
        return None if seconds is None else time.monotonic() + seconds

    def _remaining(self, deadline: float | None, shard: int) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(
                f"{self._where(shard)}: the deadline passed before it was called", "DEADLINE_EXCEEDED"
            )
        return left

    def _failed(self, shard: int, err: EmbserveError) -> EmbserveError:
        """`err` from shard `shard`, naming it; its plan is read again before its next call."""
        self._checked.discard(shard)
        if err.details.startswith(f"shard {shard} ("):
            return err
        if isinstance(err, Unavailable) and err.code == "UNAVAILABLE":
            return type(err)(f"{self._where(shard)} is unavailable: {err.details}", err.code)
        return type(err)(f"{self._where(shard)}: {err.details}", err.code)

    def _accept(self, shard: int, info: ModelInfo) -> None:
        """Checks that `shard` serves the plan's shard `shard`; remembers its tables."""
        if info.plan_digest != self.plan.digest or info.shard_count == 0 or info.shard_index != shard:
            said = f"plan {info.plan_digest or '(none)'} shard {info.shard_index if info.shard_count else '(none)'}"
            raise ServerError(
                f"{self._where(shard)} serves {said}; the client's plan is {self.plan.digest}", "FAILED_PRECONDITION"
            )
        self._infos[shard] = info
        self._checked.add(shard)

    def _unchecked(self, shards: Sequence[int] | None) -> list[int]:
        """Of `shards` (None: all), those whose plan is still to be read."""
        return [s for s in (range(self.plan.shard_count) if shards is None else shards) if s not in self._checked]

    def _build_layout(self) -> ShardLayout:
        if self._layout is not None:
            return self._layout
        keys = {info.model_keys for info in self._infos.values()}
        if len(keys) != 1:
            raise ServerError("the shards state different model key orders: they serve different models")
        facts: dict[str, tuple[str, int, int, bool, bool]] = {}
        for info in self._infos.values():
            for t in info.tables:
                rows = t.table_rows or t.num_embeddings
                facts[t.name] = (t.name, t.embedding_dim, rows, t.weighted, t.id_policy == "hash")
        order = keys.pop()
        missing = [k for k in order if k not in facts]
        if missing:
            raise ServerError(f"no shard serves table {missing[0]!r} of the model's keys {list(order)}")
        try:
            self._layout = self.plan.layout([facts[k] for k in order])
        except ValueError as err:
            raise ServerError(f"the shards do not serve the plan's tables: {err}", "FAILED_PRECONDITION") from None
        self._model_name = next(iter(self._infos.values())).name
        return self._layout

    def _split(
        self,
        features: Features,
        weights: Weights | None,
        batch_size: int | None,
        output_dtype: OutputDType | OutputDTypeName,
    ) -> tuple[SparseInput, OutputDType, dict[int, ShardPart]]:
        """Checks a request against the whole model and splits it by shard."""
        layout = self._build_layout()
        sparse = to_sparse_input(features, weights=weights, batch_size=batch_size)
        try:
            dtype = OutputDType.parse(output_dtype)
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        index = np.empty(len(sparse.keys), dtype=np.int64)
        for i, key in enumerate(sparse.keys):
            at = layout.index_of(key)
            if at is None:
                raise InvalidRequest(f"unknown key {key!r}; the model's keys are {list(layout.keys)}")
            index[i] = at
        ends = np.cumsum(sparse.lengths.sum(axis=1, dtype=np.int64))
        for i, at in enumerate(index.tolist()):
            table = layout.tables[at]
            start = int(ends[i]) - int(sparse.lengths[i].sum())
            ids = sparse.values[start : int(ends[i])]
            if ids.size and not table.hashed and int(ids.max()) >= table.rows:
                j = int(np.flatnonzero(ids >= table.rows)[0])
                raise InvalidRequest(
                    f"id {int(ids[j])} at values[{start + j}] is out of range for key {table.name!r} "
                    f"(num_embeddings {table.rows})"
                )
            if sparse.weights is not None and not table.weighted:
                w = sparse.weights[start : int(ends[i])]
                if w.size and (w != 1.0).any():
                    j = int(np.flatnonzero(w != 1.0)[0])
                    raise InvalidRequest(
                        f"weight {float(w[j])} at weights[{start + j}] is for key {table.name!r}, which is not a "
                        "weighted table (send 1.0 or no weights for its ids)"
                    )
        parts = layout.split(index, sparse.lengths, sparse.values, sparse.weights)
        return sparse, dtype, parts

    @staticmethod
    def _features(part: ShardPart) -> dict[str, tuple[np.ndarray, ...]]:
        """A shard's part as the `{key: (lengths, values[, weights])}` form."""
        out: dict[str, tuple[np.ndarray, ...]] = {}
        at = 0
        for i, key in enumerate(part.keys):
            n = int(part.lengths[i].sum())
            values = part.values[at : at + n]
            if part.weights is not None:
                out[key] = (part.lengths[i], values, part.weights[at : at + n])
            else:
                out[key] = (part.lengths[i], values)
            at += n
        return out

    def _join(
        self, batch_size: int, answers: Mapping[int, LookupResult], dtype: OutputDType, request_id: str
    ) -> LookupResult:
        """The whole model's answer from the shards' float32 answers, rounded once to `dtype`."""
        layout = self._build_layout()
        rows: dict[int, np.ndarray] = {}
        for s, answer in answers.items():
            keys, dim = layout.shard_keys[s], layout.shard_dim(s)
            if (
                answer.keys != keys
                or answer.embeddings.shape != (batch_size, dim)
                or answer.dtype != OutputDType.FLOAT32
            ):
                raise ServerError(
                    f"{self._where(s)} answered keys {list(answer.keys)} shape {list(answer.embeddings.shape)}; the "
                    f"plan gives it keys {list(keys)} shape [{batch_size}, {dim}] float32"
                )
            rows[s] = answer.embeddings
        versions = {s: a.model_version for s, a in answers.items()}
        if not versions:
            versions = {s: info.version for s, info in self._infos.items()}
        response = pb.LookupResponse(
            dtype=dtype.wire,
            shape=[batch_size, layout.output_dim],
            embeddings=to_output_bytes(layout.join(batch_size, rows), dtype),
            keys=layout.keys,
            dims=[t.dim for t in layout.tables],
            offsets=layout.offsets,
            model_name=self._model_name,
            model_version=shard_version(versions),
            request_id=request_id,
        )
        return LookupResult.from_proto(response)


class ShardedClient(_ShardedBase[Client]):
    """A blocking client that fans lookups out to a plan's shard servers itself; `lookup` answers as `Client.lookup`
    through the plan's router does.

    Args:
        plan: the sharding plan the shards serve: its YAML file, its parsed mapping, or a loaded `ShardingPlan`.
        shards: each shard index's `host:port` address, or its replicas' addresses (used round-robin).
        max_threads: threads that call shards at once, beside the calling thread (default: 8 per further shard,
            at most 64).
        timeout, retry, tls, token, max_message_bytes, transport, streams: as `Client`'s, for every shard.
    """

    def __init__(
        self,
        plan: PlanLike,
        shards: Mapping[int, str | Sequence[str]],
        *,
        max_threads: int | None = None,
        **settings: Any,
    ) -> None:
        self._opened: list[Client] = []
        super().__init__(plan, shards, **settings)
        threads = max_threads if max_threads is not None else min(MAX_FANOUT_THREADS, 8 * (self.plan.shard_count - 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="embserve-fanout")
        self._lock = threading.Lock()

    def _open(self, addresses: list[str], settings: dict[str, Any]) -> Client:
        client = Client(addresses, **settings)
        self._opened.append(client)
        return client

    def _close_opened(self) -> None:
        for client in self._opened:
            client.close()

    def _each(self, shards: Sequence[int], call: Any) -> dict[int, Any]:
        """`call(shard)` for every shard at once (the first in this thread); the first failure is raised, naming
        its shard, without waiting for the others."""
        if not shards:
            return {}
        futures = {s: self._pool.submit(call, s) for s in shards[1:]}
        out: dict[int, Any] = {}
        try:
            out[shards[0]] = call(shards[0])
        except EmbserveError as err:
            raise self._failed(shards[0], err) from None
        for s, future in futures.items():
            try:
                out[s] = future.result()
            except EmbserveError as err:
                for other in futures.values():
                    other.cancel()
                raise self._failed(s, err) from None
        return out

    def _check(self, shards: Sequence[int] | None, deadline: float | None) -> None:
        todo = self._unchecked(shards)
        if not todo:
            return
        infos = self._each(todo, lambda s: self.shards[s].metadata(timeout=self._remaining(deadline, s)))
        with self._lock:
            for s, info in infos.items():
                self._accept(s, info)
            self._build_layout()

    def metadata(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> dict[int, ModelInfo]:
        """Every shard's metadata, read now and checked against the plan."""
        deadline = self._deadline(timeout)
        self._checked.clear()
        self._check(None, deadline)
        return dict(self._infos)

    def health(self, service: str = "", *, timeout: Timeout = USE_CLIENT_DEFAULT) -> dict[int, str]:
        """Each shard's standard gRPC health status (`SERVING`, `NOT_SERVING`, ...)."""
        deadline = self._deadline(timeout)
        return self._each(
            list(self.shards), lambda s: self.shards[s].health(service, timeout=self._remaining(deadline, s))
        )

    def lookup(
        self,
        features: Features,
        *,
        weights: Weights | None = None,
        batch_size: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        output_dtype: OutputDType | OutputDTypeName = OutputDType.FLOAT32,
        request_id: str = "",
    ) -> LookupResult:
        """Pooled embeddings of `features` over the whole model; arguments as `Client.lookup`'s.

        Raises:
            EmbserveError: a subclass per failure; a shard's failure names the shard (`Unavailable` for one that
                is down, `ServerError` with code FAILED_PRECONDITION for one on another plan).
        """
        deadline = self._deadline(timeout)
        if self._layout is None:  # the layout needs every shard's tables
            self._check(None, deadline)
        sparse, dtype, parts = self._split(features, weights, batch_size, output_dtype)
        self._check(list(parts), deadline)

        def call(s: int) -> LookupResult:
            return self.shards[s].lookup(
                self._features(parts[s]),
                batch_size=sparse.batch_size,
                timeout=self._remaining(deadline, s),
                request_id=request_id,
            )

        answers = self._each(list(parts), call)
        return self._join(sparse.batch_size, answers, dtype, request_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._close_opened()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncShardedClient(_ShardedBase[AsyncClient]):
    """The asyncio twin of `ShardedClient`: the same arguments (but `max_threads`) and methods, awaitable."""

    def __init__(self, plan: PlanLike, shards: Mapping[int, str | Sequence[str]], **settings: Any) -> None:
        self._opened: list[AsyncClient] = []
        super().__init__(plan, shards, **settings)

    def _open(self, addresses: list[str], settings: dict[str, Any]) -> AsyncClient:
        client = AsyncClient(addresses, **settings)
        self._opened.append(client)
        return client

    def _close_opened(self) -> None:
        pass  # grpc.aio channels hold nothing before their first call; close() closes them

    async def _each(self, shards: Sequence[int], call: Any) -> dict[int, Any]:
        tasks = {s: asyncio.ensure_future(call(s)) for s in shards}
        try:
            if tasks:
                await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
            for s, task in tasks.items():
                if task.done() and task.exception() is not None:
                    err = task.exception()
                    if isinstance(err, EmbserveError):
                        raise self._failed(s, err) from None
                    raise err
            return {s: t.result() for s, t in tasks.items()}
        finally:
            for task in tasks.values():
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a second shard's failure is not logged as unhandled
                task.cancel()

    async def _check(self, shards: Sequence[int] | None, deadline: float | None) -> None:
        todo = self._unchecked(shards)
        if not todo:
            return

        def read(s: int) -> Awaitable[ModelInfo]:
            return self.shards[s].metadata(timeout=self._remaining(deadline, s))

        for s, info in (await self._each(todo, read)).items():
            self._accept(s, info)
        self._build_layout()

    async def metadata(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> dict[int, ModelInfo]:
        """Every shard's metadata, read now and checked against the plan."""
        deadline = self._deadline(timeout)
        self._checked.clear()
        await self._check(None, deadline)
        return dict(self._infos)

    async def health(self, service: str = "", *, timeout: Timeout = USE_CLIENT_DEFAULT) -> dict[int, str]:
        """Each shard's standard gRPC health status."""
        deadline = self._deadline(timeout)
        return await self._each(
            list(self.shards), lambda s: self.shards[s].health(service, timeout=self._remaining(deadline, s))
        )

    async def lookup(
        self,
        features: Features,
        *,
        weights: Weights | None = None,
        batch_size: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        output_dtype: OutputDType | OutputDTypeName = OutputDType.FLOAT32,
        request_id: str = "",
    ) -> LookupResult:
        """Pooled embeddings of `features` over the whole model; see `ShardedClient.lookup`."""
        deadline = self._deadline(timeout)
        if self._layout is None:  # the layout needs every shard's tables
            await self._check(None, deadline)
        sparse, dtype, parts = self._split(features, weights, batch_size, output_dtype)
        await self._check(list(parts), deadline)

        def call(s: int) -> Awaitable[LookupResult]:
            return self.shards[s].lookup(
                self._features(parts[s]),
                batch_size=sparse.batch_size,
                timeout=self._remaining(deadline, s),
                request_id=request_id,
            )

        answers = await self._each(list(parts), call)
        return self._join(sparse.batch_size, answers, dtype, request_id)

    async def close(self) -> None:
        for client in self._opened:
            await client.close()

    async def __aenter__(self) -> AsyncShardedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
