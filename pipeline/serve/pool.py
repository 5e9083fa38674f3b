"""Which instances may be awake together: the model pool's budget. Pure.

Two budgets, checked together: a pool's ``max_awake`` (how many of its instances hold their
memory at once) and each GPU's memory (the ``gpu_memory_utilization`` of the instances awake on
it adds up to 1 at most). An instance counts as awake from its spawn (or wake) until it is
confirmed asleep or its process is gone (:data:`~pipeline.serve.record.AWAKE_STATES`), so a
budget is never exceeded, not even while one instance makes room for another.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EPSILON = 1e-9


@dataclass(frozen=True)
class Slot:
    """What one instance takes when awake."""

    name: str
    pool: str | None
    max_awake: int
    gpu_ids: tuple[int, ...]
    share: float


def conflicts(a: Slot, b: Slot) -> bool:
    """Whether ``b`` awake can keep ``a`` from waking: same pool or a shared GPU."""
    if a.name == b.name:
        return False
    return (a.pool is not None and a.pool == b.pool) or bool(set(a.gpu_ids) & set(b.gpu_ids))


def fits(slot: Slot, awake: Iterable[Slot]) -> bool:
    """Whether ``slot`` may wake beside the ``awake`` instances."""
    others = [o for o in awake if o.name != slot.name]
    in_pool = sum(1 for o in others if slot.pool is not None and o.pool == slot.pool)
    if slot.pool is not None and in_pool >= slot.max_awake:
        return False
    for gpu in slot.gpu_ids:
        used = sum(o.share for o in others if gpu in o.gpu_ids)
        if used + slot.share > 1.0 + EPSILON:
            return False
    return True


def make_room(slot: Slot, awake: Sequence[Slot], idle: Sequence[Slot]) -> list[Slot] | None:
    """The instances to put away so that ``slot`` fits, taken from ``idle`` (awake and with
    nothing in flight, least recently used first) in that order, only those that stand in
    its way; [] when it fits already, None when putting every idle one away would not do."""
    remaining = list(awake)
    chosen: list[Slot] = []
    if fits(slot, remaining):
        return chosen
    for victim in idle:
        if not conflicts(slot, victim):
            continue
        remaining = [o for o in remaining if o.name != victim.name]
        chosen.append(victim)
        if fits(slot, remaining):
            return chosen
    return None
