"""Exponential backoff: the one definition every retry in the project uses.

Invariants:
- ``backoff_delay(n)`` is 0 for no failure, ``base`` after the first, doubling per
  consecutive failure, never above ``cap``. Pure: no clock, no sleep.
- Caps are named here: a service pass retries up to ``PASS_CAP`` apart, a kernel map
  entry up to ``ENTRY_CAP`` apart (Cilium's reconciler: 100 ms → 60 s).
"""

from __future__ import annotations

BASE = 0.1
PASS_CAP = 10.0
ENTRY_CAP = 60.0


def backoff_delay(attempts: int, base: float = BASE, cap: float = ENTRY_CAP) -> float:
    """Seconds to wait after ``attempts`` consecutive failures (1 → base)."""
    if attempts <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(attempts - 1, 64))
