"""Room for new callers near the connection cap: connections that never made a call are closed, oldest first.

gRPC closes connections beyond `max_connections` as they arrive, so a flood of idle connections (HTTP/2 set up,
no call) that fills the cap would lock new callers out until the idle limit closes the flood, minutes later. Near
the cap, this closes connections that have made no call within a grace period, oldest first (as Envoy's overload
manager and nginx's idle timeouts do), keeping a margin of free places for new callers.

gRPC's Python API does not expose its connections, so they are read from the kernel (Linux: the process's socket
descriptors in /proc/self/fd and their peers in /proc/net/tcp and tcp6), matched to the peers the server's calls
came from, and closed with `shutdown(2)` on a duplicate of the descriptor, checked to be the same socket first: gRPC
then sees the connection end and frees it. Elsewhere the reaper does nothing. The scan runs off the event loop,
once a second, and reads the connections only when the descriptors open come near the cap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PeerActivity", "UnusedConnectionReaper"]

logger = logging.getLogger(__name__)

_PROC_FD = Path("/proc/self/fd")
_ESTABLISHED = "01"


class PeerActivity:
    """The peers (gRPC's `ipv4:host:port` strings, one per connection) that have made a call, for at most
    `max_peers` (the connection cap: a peer is a connection)."""

    def __init__(self, max_peers: int) -> None:
        self._max = max_peers
        self._peers: dict[str, None] = {}

    def saw(self, peer: str) -> None:
        if peer not in self._peers:
            if len(self._peers) >= self._max:
                self._peers.pop(next(iter(self._peers)))  # the oldest: its connection is the likeliest gone
            self._peers[peer] = None

    def __contains__(self, peer: str) -> bool:
        return peer in self._peers

    def keep_only(self, peers: set[str]) -> None:
        """Forgets peers whose connections are closed."""
        for peer in [p for p in self._peers if p not in peers]:
            del self._peers[peer]


def _peer_name(address: str) -> str:
    """gRPC's peer string for a /proc/net/tcp address `0100007F:D036` (or its 32-digit IPv6 form)."""
    host, port = address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"ipv4:{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # each 32-bit word is in host order
    if words.startswith(b"\0" * 10 + b"\xff\xff"):  # IPv4-mapped: gRPC names the IPv4 address
        return f"ipv4:{socket.inet_ntop(socket.AF_INET, words[12:])}:{int(port, 16)}"
    return f"ipv6:[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def _connections(port: int) -> Iterator[tuple[int, str]]:
    """(socket inode, peer) of each established connection to local `port`."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _ESTABLISHED or int(fields[1].rsplit(":", 1)[1], 16) != port:
                continue
            yield int(fields[9]), _peer_name(fields[2])


def _socket_descriptors() -> dict[int, int]:
    """This process's socket descriptors by inode."""
    out: dict[int, int] = {}
    for entry in os.scandir(_PROC_FD):
        try:
            target = os.readlink(entry.path)
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            out[int(target[8:-1])] = int(entry.name)
    return out


class UnusedConnectionReaper:
    """Keeps `margin` places free under the connection `cap` by closing connections to `port` that made no call
    (per `activity`) within `grace_s` seconds of being first seen, oldest first.

    Args:
        port: the server's port.
        cap: the connection cap (`max_connections`).
        grace_s: how long a connection may stay without a call when places run short.
        activity: the peers that made a call.
        margin: places kept free (by default 1/64 of the cap, at least 16).
    """

    def __init__(
        self, *, port: int, cap: int, grace_s: float, activity: PeerActivity, margin: int | None = None
    ) -> None:
        self.port = port
        self.cap = cap
        self.grace_s = grace_s
        self.margin = margin if margin is not None else max(16, cap // 64)
        self._activity = activity
        self._first_seen: dict[int, float] = {}
        self.closed = 0

    @staticmethod
    def supported() -> bool:
        return _PROC_FD.is_dir() and Path("/proc/net/tcp").exists()

    async def run(self, interval_s: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await loop.run_in_executor(None, self.sweep)
            except Exception:  # a failed sweep must not stop the next one
                logger.exception("sweep of unused connections failed")

    def sweep(self) -> int:
        """One pass; returns the connections closed."""
        if len(os.listdir(_PROC_FD)) < self.cap - self.margin:
            self._first_seen.clear()
            return 0
        now = time.monotonic()
        descriptors = _socket_descriptors()
        connections = [(inode, peer) for inode, peer in _connections(self.port) if inode in descriptors]
        first_seen = {inode: self._first_seen.get(inode, now) for inode, _ in connections}
        self._first_seen = first_seen
        self._activity.keep_only({peer for _, peer in connections})
        excess = len(connections) - (self.cap - 2 * self.margin)
        if excess <= 0:
            return 0
        unused = sorted(
            (first_seen[inode], inode)
            for inode, peer in connections
            if peer not in self._activity and now - first_seen[inode] >= self.grace_s
        )
        closed = sum(self._close(descriptors[inode], inode) for _, inode in unused[:excess])
        if closed:
            self.closed += closed
            logger.warning(
                "closed unused connections near the connection cap",
                extra={"closed": closed, "connections": len(connections), "cap": self.cap},
            )
        return closed

    @staticmethod
    def _close(fd: int, inode: int) -> bool:
        try:
            dup = os.dup(fd)
        except OSError:
            return False
        try:
            if os.fstat(dup).st_ino != inode:  # gRPC closed it and the number was reused meanwhile
                return False
            sock = socket.socket(fileno=dup)
            dup = -1  # the socket object owns it now
            try:
                sock.shutdown(socket.SHUT_RDWR)  # gRPC sees the connection end and frees it
            finally:
                sock.close()
            return True
        except OSError:
            return False
        finally:
            if dup >= 0:
                os.close(dup)
