"""The runtime budgets of admission: request messages held before they are queued, and answers waiting for
their clients.

A request message is counted in the `ReceiveBudget` from the moment its handler has it until it is queued (or
refused); queued, its arrays and the answer it will produce are counted by the batcher's queue bound, and in a
batch by the batch bound. Each answer is also counted for its connection from admission until the client has
taken it (`ResponseBudget`): a connection that does not read has its new calls held (flow control), and answers
computed and not taken are bounded over all connections. Every charge is released by the code path that made it,
with a context manager or in the one callback that ends it, so that every budget is back at zero once the calls
end, however they end. The bounds themselves are computed once (`bounds.Bounds`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from .errors import DeadlineExpired, Overloaded

__all__ = ["Charge", "Owed", "ReceiveBudget", "ResponseBudget"]


class Owed:
    """One answer a connection is owed: reserved at admission, computed (`computed`), then released (`release`,
    idempotent) once the transport has taken it or the call ends without it."""

    __slots__ = ("_budget", "computed", "nbytes", "peer")

    def __init__(self, budget: ResponseBudget, peer: str, nbytes: int) -> None:
        self._budget = budget
        self.peer = peer
        self.nbytes = nbytes
        self.computed = False

    def mark_computed(self) -> None:
        """The answer exists now: it counts among the answers not yet taken (the slow readers' bytes)."""
        if not self.computed and self.nbytes:
            self.computed = True
            self._budget.unsent += self.nbytes

    def release(self) -> None:
        if self.nbytes:
            self._budget._release(self)
            self.nbytes = 0


class ResponseBudget:
    """Answers owed to each connection (gRPC's peer address): admitted and not yet taken by the client, whether
    queued, computing, or computed and waiting to be sent.

    `admit` holds a call while its connection is owed `max_per_connection` bytes or more, until the client takes
    answers (flow control: a client that reads is never refused for it; one that does not read has its new calls
    held, and its memory bounded by the bound plus one answer). Calls held on one connection may keep at most
    `max_held_request_bytes` of request messages waiting; beyond it they are refused RESOURCE_EXHAUSTED, so that a
    client that never reads cannot fill the receive budget with held calls. Answers computed and not yet taken, over
    all connections, are the slow readers' bytes (`unsent`): at `max_total` or over, new calls are refused
    RESOURCE_EXHAUSTED at once (the server sheds load). A LookupStream, which can stop reading its messages, waits
    for room before it reads (`wait_for_room`) and holds no request meanwhile.
    """

    def __init__(
        self,
        max_total: int,
        max_per_connection: int,
        max_held_request_bytes: int | None = None,
        on_hold: Callable[[], None] | None = None,
    ) -> None:
        self.max_total = max_total
        self.max_per_connection = max_per_connection
        self.max_held_request_bytes = max_held_request_bytes
        self.owed = 0  # admitted answers not yet taken, all connections
        self.unsent = 0  # of those, the ones computed
        self.waiting = 0  # calls held by flow control
        self._by_peer: dict[str, int] = {}
        self._held_requests: dict[str, int] = {}  # request bytes of the calls held, per connection
        self._room: dict[str, asyncio.Event] = {}  # only for connections with calls held
        self._on_hold = on_hold  # told each time a call or a stream's read is held

    def pending(self, peer: str) -> int:
        """Bytes of answers owed to `peer`."""
        return self._by_peer.get(peer, 0)

    @property
    def connections(self) -> int:
        """Connections owed answers."""
        return len(self._by_peer)

    def _full(self, peer: str, nbytes: int) -> bool:
        owed = self._by_peer.get(peer, 0)
        return owed > 0 and owed + nbytes > self.max_per_connection

    async def wait_for_room(self, peer: str, nbytes: int = 1, timeout: float | None = None) -> None:
        """Returns once `peer` is owed less than its bound (room for `nbytes` more, for a call that knows its
        answer's size); `DeadlineExpired` when `timeout` seconds pass first."""
        if not self._full(peer, nbytes):
            return
        if self._on_hold is not None:
            self._on_hold()
        self.waiting += 1
        try:
            while self._full(peer, nbytes):
                room = self._room.get(peer)
                if room is None:
                    room = self._room[peer] = asyncio.Event()
                try:
                    await asyncio.wait_for(room.wait(), timeout)
                except TimeoutError:
                    raise DeadlineExpired(
                        f"deadline passed while this connection was owed {self.pending(peer)} bytes of answers its "
                        f"client has not taken, over the server's max_pending_response_bytes_per_connection "
                        f"{self.max_per_connection}"
                    ) from None
        finally:
            self.waiting -= 1

    async def admit(self, peer: str, nbytes: int, *, request_bytes: int = 0, timeout: float | None = None) -> Owed:
        """Admits an answer of `nbytes` for `peer`: holds the call while the connection is at its bound (its
        request of `request_bytes` held with it), refuses it while the slow readers' bytes are at the total."""
        if self._full(peer, nbytes):
            held = self._held_requests.get(peer, 0)
            if self.max_held_request_bytes is not None and held and held + request_bytes > self.max_held_request_bytes:
                raise Overloaded(
                    f"this connection is owed {self.pending(peer)} bytes of answers its client has not taken and "
                    f"{held} bytes of its requests wait for them; read the answers before sending more"
                )
            self._held_requests[peer] = held + request_bytes
            try:
                await self.wait_for_room(peer, nbytes, timeout)
            finally:
                left = self._held_requests[peer] - request_bytes
                if left:
                    self._held_requests[peer] = left
                else:
                    del self._held_requests[peer]
        return self.reserve(peer, nbytes)

    def reserve(self, peer: str, nbytes: int) -> Owed:
        """Counts an answer owed to `peer` without waiting (a stream waits before it reads instead); refuses it
        while the slow readers' bytes are at the total."""
        self.check_total(nbytes)
        if nbytes:
            self.owed += nbytes
            self._by_peer[peer] = self._by_peer.get(peer, 0) + nbytes
        return Owed(self, peer, nbytes)

    def check_total(self, nbytes: int) -> None:
        """`Overloaded` when the answers computed and not yet taken, over all connections, are at `max_total`."""
        if self.unsent and self.unsent >= self.max_total:
            raise Overloaded(
                f"{self.unsent} bytes of answers are waiting for clients that have not read them, over the server's "
                f"max_pending_response_bytes {self.max_total}; this call needs {nbytes}; retry later"
            )

    def _release(self, owed: Owed) -> None:
        peer, nbytes = owed.peer, owed.nbytes
        self.owed -= nbytes
        if owed.computed:
            self.unsent -= nbytes
        left = self._by_peer[peer] - nbytes
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]
        room = self._room.pop(peer, None)
        if room is not None:
            room.set()  # the calls held re-check their room


class Charge:
    """Bytes counted in a `ReceiveBudget`; `release` (idempotent) gives them back."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: ReceiveBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def release(self) -> None:
        self._budget.used -= self.nbytes
        self.nbytes = 0


class ReceiveBudget:
    """Bytes of request messages that handlers hold and have not yet queued, at most `max_bytes`.

    A message is counted at its own size once its handler has it (`charge`), until it is queued, where the
    queue bound takes over, or refused. Without room it is refused RESOURCE_EXHAUSTED at once. A message alone is
    always taken: `max_message_bytes` bounds it. What gRPC's core holds before a handler has a message is bounded
    by the message limit times the calls open at once (docs/hardening.md).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def charge(self, nbytes: int) -> Charge:
        """Counts a message now held, or `Overloaded`."""
        if self.used and self.used + nbytes > self.max_bytes:
            raise Overloaded(
                f"{self.used} bytes of request messages are waiting to be queued and this one has {nbytes}, over "
                f"the server's max_receive_bytes {self.max_bytes}; retry later"
            )
        self.used += nbytes
        return Charge(self, nbytes)

    @contextlib.contextmanager
    def holding(self, nbytes: int) -> Iterator[Charge]:
        """`charge` on entry; on exit, what the block did not release already is released."""
        charge = self.charge(nbytes)
        try:
            yield charge
        finally:
            charge.release()
