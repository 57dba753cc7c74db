"""Prometheus metrics (prometheus-client), one registry per server so several servers can share a process.

Label values come only from fixed sets: a method name a caller made up is counted as `unknown`, so no caller can
add label sets (each one a permanent series in `/metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from embserve.oip import wire as oip
from embserve.v1.wire import METHODS

__all__ = ["UNKNOWN_METHOD", "ServerMetrics", "method_label"]

UNKNOWN_METHOD = "unknown"
_KNOWN_METHODS = frozenset(METHODS) | frozenset(oip.METHODS)

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_EXAMPLE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def method_label(name: str) -> str:
    """The `method` label for a method name: itself if embserve.v1 or the Open Inference Protocol has it, else
    `unknown`."""
    return name if name in _KNOWN_METHODS else UNKNOWN_METHOD


class ServerMetrics:
    """The server's metrics; also the batcher's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("embserve_requests", "Calls by RPC and status code", ["method", "code"], registry=r)
        self._codes: dict[tuple[str, grpc.StatusCode], Any] = {}
        self.examples = Counter("embserve_examples", "Examples served", registry=r)
        self.request_seconds = Histogram(
            "embserve_request_seconds", "Server time per call", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "embserve_queue_wait_seconds", "Time a request waited for its batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_examples = Histogram(
            "embserve_batch_examples", "Examples per forward", buckets=_EXAMPLE_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "embserve_batch_requests", "Requests per forward", buckets=_EXAMPLE_BUCKETS, registry=r
        )
        self.batches = Counter("embserve_batches", "Forwards run", registry=r)
        self.forward_seconds = Histogram(
            "embserve_forward_seconds", "Forward time per batch, copies included", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_examples = Gauge("embserve_queue_examples", "Examples waiting in the batch queue", registry=r)
        self.drops = Counter("embserve_dropped", "Requests dropped before computing, by reason", ["reason"], registry=r)
        self.model = Info("embserve_model", "The model being served", registry=r)
        self.health_watches = Gauge(
            "embserve_tokenless_health_watches", "Health.Watch streams open without a valid token", registry=r
        )
        self.reloads = Counter("embserve_model_reloads", "Model reloads by outcome", ["outcome"], registry=r)
        self.flow_control_holds = Counter(
            "embserve_flow_control_holds",
            "Calls and stream reads held because their connection was owed its bound of answers not yet read",
            registry=r,
        )
        self.registry.register(_PageFaults())
        self.budgets = Gauge(
            "embserve_budget", "What calls in progress hold now, by budget (bytes, or calls)", ["budget"], registry=r
        )
        self.update_rows = Counter("embserve_update_rows", "Rows written by row updates in this process", registry=r)
        self.update_bytes = Counter(
            "embserve_update_bytes", "Bytes of rows written by row updates in this process", registry=r
        )
        self.update_sequence = Gauge(
            "embserve_update_sequence",
            "The last row update applied in this process (its delta log sequence)",
            registry=r,
        )
        self.update_apply_seconds = Histogram(
            "embserve_update_apply_seconds",
            "Time one update held the batches (its rows written between two batches)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.update_log_bytes = Gauge(
            "embserve_update_log_bytes", "Bytes the delta log of the served base holds on disk", registry=r
        )
        self.compactions = Counter(
            "embserve_compactions",
            "Background compactions this process ran, by outcome (ok, failed, or other_base: already compacted)",
            ["outcome"],
            registry=r,
        )

    def track_tables(self, tables: Sequence[str], resident: Callable[[str], int], disk: Callable[[str], int]) -> None:
        """Each table's bytes in memory now and its row file's bytes on disk, read when `/metrics` is scraped (the
        tables are the model's: a fixed set of labels)."""
        resident_gauge = Gauge(
            "embserve_table_resident_bytes",
            "Bytes of the table in memory now (mmap: its pages in the page cache)",
            ["table"],
            registry=self.registry,
        )
        disk_gauge = Gauge(
            "embserve_table_disk_bytes",
            "Bytes the table's row file takes on disk (0: not served from one)",
            ["table"],
            registry=self.registry,
        )
        for name in tables:
            resident_gauge.labels(name).set_function(lambda name=name: resident(name))
            disk_gauge.labels(name).set_function(lambda name=name: disk(name))

    def track_budgets(self, accounting: Callable[[], Mapping[str, int]]) -> None:
        """Exports each entry of `accounting()` (a fixed set of names) as `embserve_budget{budget=...}`, read when
        `/metrics` is scraped: nothing is added to a call's path."""
        for name in accounting():
            self.budgets.labels(name).set_function(lambda name=name: accounting()[name])

    def set_model(self, name: str, version: str, engine: str, device: str) -> None:
        self.model.info({"name": name, "version": version, "engine": engine, "device": device})

    # BatcherObserver
    def queue_depth(self, examples: int) -> None:
        self.queue_examples.set(examples)

    def batch_formed(self, examples: int, requests: int, queue_waits_s: Sequence[float]) -> None:
        self.batches.inc()
        self.batch_examples.observe(examples)
        self.batch_requests.observe(requests)
        for wait in queue_waits_s:
            self.queue_wait.observe(wait)

    def dropped(self, reason: str, count: int = 1) -> None:
        self.drops.labels(reason).inc(count)

    def count(self, method: str, code: grpc.StatusCode) -> None:
        """One call (or stream message) of `method` answered with `code`. The counter of each label set is bound
        once and kept: label lookups are measurable on the per-call path, and the methods are a fixed set."""
        counter = self._codes.get((method, code))
        if counter is None:
            counter = self._codes[(method, code)] = self.requests.labels(method_label(method), code.name)
        counter.inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent), for tests and the benchmark harness."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0


class _PageFaults(Collector):  # type: ignore[misc]
    """The process's page faults (Linux /proc/self/stat), by kind: major ones read from disk, as an `mmap` table's
    pages not in the page cache are."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("embserve_page_faults", "Page faults of this process", labels=["kind"])
        try:
            fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return
        family.add_metric(["minor"], float(fields[7]))  # minflt: field 10 of stat, 8 after the command
        family.add_metric(["major"], float(fields[9]))  # majflt: field 12
        yield family
