"""A sharded deployment on loopback: one `embserve serve --plan P --shard K` process per shard and an `embserve
route` process in front of them, for the tests, the sharding benchmark and `make cluster`.

    with Cluster(model_yaml, plan_yaml) as cluster:       # every shard serving, then the router routing
        cluster.router.address, cluster.shard_addresses   # {0: "127.0.0.1:PORT", ...}
        cluster.kill_shard(1); cluster.restart_shard(1)   # SIGKILL, then the same command on the same port

`python -m embserve.benchmarks.cluster --model M --plan P` (`make cluster ARGS=...`) starts one and keeps it up
until SIGINT or SIGTERM: the router on `--port` (default 50051), shard K on `--port + 1 + K`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .procs import ServerProcess

__all__ = ["Cluster", "main", "router_command", "shard_command"]

STARTUP_TIMEOUT_S = 300


def _plan_shards(plan: Path | str) -> int:
    """The number of shards a plan file lists (read without the model's config)."""
    import yaml

    return len(yaml.safe_load(Path(plan).read_text())["shards"])


def shard_command(model: Path | str, plan: Path | str, shard: int, *extra: str, port: int = 0) -> list[str]:
    """`embserve serve` for one shard of a plan, on loopback (metrics on a free port)."""
    return [
        sys.executable,
        "-m",
        "embserve.server",
        "--model",
        str(model),
        "--plan",
        str(plan),
        "--shard",
        str(shard),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *extra,
    ]


def router_command(
    model: Path | str, plan: Path | str, shards: dict[int, str], *extra: str, port: int = 0
) -> list[str]:
    """`embserve route` over the given shard addresses, on loopback (metrics on a free port)."""
    addresses = [a for k, address in sorted(shards.items()) for a in ("--shard-address", f"{k}={address}")]
    return [
        str(Path(sys.executable).parent / "embserve"),
        "route",
        "--model",
        str(model),
        "--plan",
        str(plan),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *addresses,
        *extra,
    ]


class Cluster:
    """Shard processes and a router process on loopback; stopped (SIGTERM, then SIGKILL) on exit.

    Args:
        model: the whole model's config (YAML path or built-in name).
        plan: the sharding plan.
        shard_args: further `embserve serve` arguments for every shard (e.g. `--checkpoint`).
        router_args: further `embserve route` arguments.
        port: the router's port (0: a free one); shard K's is `port + 1 + K` when `port` is given.
        router: False for the shards alone.
    """

    def __init__(
        self,
        model: Path | str,
        plan: Path | str,
        *,
        shard_args: Sequence[str] = (),
        router_args: Sequence[str] = (),
        port: int = 0,
        router: bool = True,
    ) -> None:
        self.model, self.plan = model, plan
        self.shard_args, self.router_args = list(shard_args), list(router_args)
        self.port = port
        self.with_router = router
        self.count = _plan_shards(plan)
        self.shards: dict[int, ServerProcess] = {}
        self.router: ServerProcess | None = None

    @property
    def shard_addresses(self) -> dict[int, str]:
        return {k: s.address for k, s in self.shards.items()}

    @property
    def router_address(self) -> str:
        assert self.router is not None, "started without a router"
        return self.router.address

    def _shard(self, k: int, port: int) -> ServerProcess:
        command = shard_command(self.model, self.plan, k, *self.shard_args, port=port)
        return ServerProcess(command, f"shard {k}")

    def start(self) -> None:
        try:
            for k in range(self.count):
                self.shards[k] = self._shard(k, self.port + 1 + k if self.port else 0)
                self.shards[k].start()
            for shard in self.shards.values():
                shard.wait_ready(STARTUP_TIMEOUT_S)
            if self.with_router:
                command = router_command(self.model, self.plan, self.shard_addresses, *self.router_args, port=self.port)
                self.router = ServerProcess(command, "router")
                self.router.start()
                entry = self.router.logs.wait("routing", timeout=STARTUP_TIMEOUT_S)[0]
                self.router.address = str(entry["address"])
        except BaseException:
            self.stop()
            raise

    def kill_shard(self, k: int) -> None:
        """SIGKILL shard `k` and wait for it to be gone."""
        self.shards[k].signal(signal.SIGKILL)
        self.shards[k].popen.wait(30)
        self.shards[k].stop()

    def restart_shard(self, k: int) -> None:
        """Starts shard `k` again on the port it had, and waits until it serves."""
        port = int(self.shards[k].address.rsplit(":", 1)[1])
        self.shards[k].stop()
        self.shards[k] = self._shard(k, port)
        self.shards[k].start()
        self.shards[k].wait_ready(STARTUP_TIMEOUT_S)

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for shard in self.shards.values():
            shard.stop()

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embserve.benchmarks.cluster",
        description="Start a plan's shard servers and a router on loopback until SIGINT or SIGTERM.",
    )
    parser.add_argument("--model", required=True, help="the whole model's config (YAML path or built-in name)")
    parser.add_argument("--plan", required=True, help="the sharding plan (embserve plan -o)")
    parser.add_argument("--port", type=int, default=50051, help="the router's port; shard K listens on PORT + 1 + K")
    parser.add_argument("--host", default="127.0.0.1", help="loopback only: 127.0.0.1")
    parser.add_argument(
        "--shard-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra `embserve serve` argument for every shard, e.g. --shard-arg=--checkpoint=w.safetensors",
    )
    args = parser.parse_args(argv)
    if args.host != "127.0.0.1":
        parser.error("the cluster runs on loopback: --host 127.0.0.1")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with Cluster(args.model, args.plan, shard_args=args.shard_arg, port=args.port) as cluster:
            for k, address in cluster.shard_addresses.items():
                print(f"shard {k} serving on {address}", flush=True)
            print(f"router routing on {cluster.router_address}", flush=True)
            stop.wait()
    except RuntimeError as err:
        print(f"cluster: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
