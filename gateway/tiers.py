"""Priorities: budgets per tier over the two pools the gateway can run out of.

Both pools (messages in flight to Pub/Sub, bytes in the spill) are shared by every type. A
tier may take from a pool only while the pool's use, after the take, stays within the tier's
share of it. So when the pool fills, ``low`` is refused first, then ``normal``, and ``high``
may use all of it. ``low`` has no share of the spill: during an outage it is shed at once.
"""

from __future__ import annotations

from event_delivery.contract.registry import TIERS

IN_FLIGHT_SHARES = {"high": 1.0, "normal": 0.6, "low": 0.3}
SPILL_SHARES = {"high": 1.0, "normal": 0.25, "low": 0.0}
assert set(IN_FLIGHT_SHARES) == set(SPILL_SHARES) == set(TIERS)


class Budget:
    """One pool of ``capacity`` units (messages or bytes), with each tier's share of it."""

    def __init__(self, capacity: int, shares: dict[str, float]):
        self.capacity = capacity
        self.shares = shares
        self.used = 0
        self.used_by = dict.fromkeys(shares, 0)

    def try_take(self, tier: str, amount: int) -> bool:
        """Takes ``amount`` for ``tier`` if the pool stays within the tier's share; else takes nothing."""
        if self.used + amount > self.shares[tier] * self.capacity:
            return False
        self.take(tier, amount)
        return True

    def take(self, tier: str, amount: int) -> None:
        """Takes without asking (what a restarted gateway finds already in its spill)."""
        self.used += amount
        self.used_by[tier] += amount

    def give_back(self, tier: str, amount: int) -> None:
        self.used -= amount
        self.used_by[tier] -= amount

    def fraction_used(self) -> float:
        return self.used / self.capacity if self.capacity else 1.0
