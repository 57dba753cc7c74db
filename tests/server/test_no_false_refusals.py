"""The byte bounds never refuse a well-behaved caller: one channel, 64 and 256 callers in a closed loop, each
reading every answer, with every benchmark workload's requests (512-example ones included) over Lookup,
LookupStream and ModelInfer, with one worker and with `--workers 2`, at the server's default byte bounds.

The models have the benchmark workloads' tables and dims, so requests and answers have the benchmarks' shapes and
sizes (a `large` answer is 3.4 MB), with 1,000 rows per table so that they load in a moment. The queue-time
budget is raised: refusing what would wait too long is a latency policy, not a byte bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from embserve.benchmarks.loadgen import fixed_calls
from embserve.benchmarks.procs import ServerProcess, embserve_command
from embserve.benchmarks.workloads import WORKLOADS, Workload, encode_lookups, encode_model_infer
from embserve.oip import wire as oip
from embserve.v1.wire import LOOKUP_METHOD
from tests.support import write_model_config

pytestmark = pytest.mark.slow

ROWS = 1000
CALLERS = (64, 256)
CALLS_EACH = 3
APIS = {
    "Lookup": ("unary", LOOKUP_METHOD),
    "LookupStream": ("stream", LOOKUP_METHOD),
    "ModelInfer": ("unary", oip.MODEL_INFER_METHOD),
}
# Models by the workloads they serve: `small` and `large` share one.
MODELS = {"small": ("small", "large"), "multihot": ("multihot",)}


@pytest.fixture(scope="module", params=[1, 2], ids=["one-worker", "two-workers"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(scope="module", params=list(MODELS))
def server(
    request: pytest.FixtureRequest, workers: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, list[Workload]]]:
    workloads = [WORKLOADS[name](ROWS) for name in MODELS[request.param]]
    path = write_model_config(workloads[0].config, tmp_path_factory.mktemp("models") / f"{request.param}.yaml")
    args = ["--max-queue-wait-ms", "60000", "--workers", str(workers)]
    proc = ServerProcess(embserve_command(path, *args), f"embserve {request.param}")
    proc.start()
    try:
        if workers == 1:
            proc.wait_ready(120)
        else:  # the supervisor's line names the shared port; each worker has a metrics port of its own
            proc.address = str(proc.logs.wait("workers serving", timeout=120)[0]["address"])
        yield proc, workloads
    finally:
        proc.stop()


@pytest.mark.parametrize("api", list(APIS))
def test_a_caller_that_reads_its_answers_is_never_refused(
    server: tuple[ServerProcess, list[Workload]], workers: int, api: str
) -> None:
    proc, workloads = server
    transport, method = APIS[api]
    for workload in workloads:
        requests = workload.requests(32, seed=1)
        if api == "ModelInfer":
            payloads = encode_model_infer(requests, workloads[0].config.name)  # the model served
        else:
            payloads = encode_lookups(requests)
        for callers in CALLERS:
            codes = asyncio.run(
                fixed_calls(
                    proc.address,
                    payloads,
                    concurrency=callers,
                    calls_each=CALLS_EACH,
                    transport=transport,
                    method=method,
                    connections=1,
                )
            )
            assert codes == {"OK": callers * CALLS_EACH}, (workload.name, api, callers, dict(codes))
    if workers == 1 and "large" in [w.name for w in workloads]:
        # 256 callers owed 3.4 MB answers each pass the connection's bound: it was reached, and held them.
        assert proc.metrics()["embserve_flow_control_holds_total"] > 0
