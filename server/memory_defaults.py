"""The defaults of the byte bounds: each a fraction of the host's physical memory, kept within a floor and a cap.
Torch-free; the config's help texts and `bounds.Bounds` both read them."""

from __future__ import annotations

import dataclasses
import os

__all__ = [
    "BATCH_BYTES_DEFAULT",
    "PENDING_BYTES_DEFAULT",
    "PENDING_PER_CONNECTION_DEFAULT",
    "QUEUE_BYTES_DEFAULT",
    "RECEIVE_BYTES_DEFAULT",
    "RESPONSE_BYTES_DEFAULT",
    "DefaultRule",
    "memory_default",
    "physical_memory",
]

MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class DefaultRule:
    """A bound's default: `fraction` of physical memory, kept within [floor, cap]."""

    fraction: float
    floor: int
    cap: int

    def __str__(self) -> str:
        def size(n: int) -> str:
            return f"{n // GiB} GiB" if n % GiB == 0 else f"{n // MiB} MiB"

        return f"1/{round(1 / self.fraction)} of physical memory, {size(self.floor)} to {size(self.cap)}"


QUEUE_BYTES_DEFAULT = DefaultRule(1 / 32, 64 * MiB, 512 * MiB)
RESPONSE_BYTES_DEFAULT = DefaultRule(1 / 64, 16 * MiB, 256 * MiB)
PENDING_BYTES_DEFAULT = DefaultRule(1 / 64, 64 * MiB, 256 * MiB)
PENDING_PER_CONNECTION_DEFAULT = DefaultRule(1 / 128, 32 * MiB, 128 * MiB)
RECEIVE_BYTES_DEFAULT = DefaultRule(1 / 64, 128 * MiB, 512 * MiB)
BATCH_BYTES_DEFAULT = DefaultRule(1 / 256, 32 * MiB, 128 * MiB)


def physical_memory() -> int:
    """The host's physical memory in bytes (4 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 4 * GiB


def memory_default(rule: DefaultRule, memory: int | None = None) -> int:
    """`rule.fraction x physical memory`, kept within [floor, cap]."""
    return int(min(rule.cap, max(rule.floor, rule.fraction * (physical_memory() if memory is None else memory))))
