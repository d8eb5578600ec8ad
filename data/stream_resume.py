"""Re-splitting a saved stream position over a different number of slots (ranks x workers).

A requeued job often gets other nodes, or a user changes ``num_workers``. The saved position of
every old slot (its shard visits, the offset in the current shard, the samples waiting in its
shuffle buffer) is turned into *units* of unread work of the current epoch's first pass
(shard, first offset, a stride and a residue, or an explicit offset list), which are split over the
new slots. Guarantee: no sample read before the resume is replayed ahead of the epoch's unread
samples; the order differs from an uninterrupted run. Equal steps per rank still hold (a slot
whose units run out starts another pass over its shards, as any slot does).

A unit is ``[shard, start, step, rem, only]``: offsets ``o >= start`` with ``o % step == rem``,
restricted to the list ``only`` when it is not None.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

Unit = list  # [shard, start, step, rem, only | None]


def unit_size(unit: Unit, count: int | None) -> int:
    """Estimated number of samples a unit holds (1 for a shard whose count is unknown)."""
    shard, start, step, rem, only = unit
    if only is not None:
        return sum(1 for o in only if o >= start and o % step == rem)
    if count is None:
        return 1
    first = start + (rem - start) % step
    return max(0, math.ceil((count - first) / step))


def split_unit(unit: Unit) -> tuple[Unit, Unit]:
    """Two halves of a unit: a list is cut in two, a stride doubles (each half keeps every other)."""
    shard, start, step, rem, only = unit
    if only is not None:
        keep = [o for o in only if o >= start and o % step == rem]
        half = len(keep) // 2
        return [shard, 0, 1, 0, keep[:half]], [shard, 0, 1, 0, keep[half:]]
    return [shard, start, 2 * step, rem, None], [shard, start, 2 * step, rem + step, None]


def assign(units: Sequence[tuple[int, Unit]], counts: Sequence[Sequence[int] | None], nslots: int) -> list[list[list[Unit]]]:
    """Split (pool, unit) pairs over ``nslots`` slots with balanced sample counts.

    Units larger than a quarter of a slot's share are halved first (a halved unit costs one more
    read of its shard, only at this resume); then the largest unit goes to the least-loaded slot.
    Returns per slot, per pool, a list of units.
    """
    npools = len(counts)

    def size(pu: tuple[int, Unit]) -> int:
        p, u = pu
        return unit_size(u, None if counts[p] is None else counts[p][u[0]])

    work = [(p, list(u)) for p, u in units if size((p, list(u))) > 0]
    total = sum(size(w) for w in work)
    limit = max(1, total // (4 * nslots)) if total else 1
    out: list[tuple[int, Unit]] = []
    while work:
        p, u = work.pop()
        if size((p, u)) > limit:
            a, b = split_unit(u)
            work += [(p, a), (p, b)]
        else:
            out.append((p, u))
    out.sort(key=lambda pu: (-size(pu), pu[0], pu[1][0], pu[1][2], pu[1][3]))
    slots: list[list[list[Unit]]] = [[[] for _ in range(npools)] for _ in range(nslots)]
    load = [0] * nslots
    for p, u in out:
        s = min(range(nslots), key=lambda k: (load[k], k))
        slots[s][p].append(u)
        load[s] += size((p, u))
    for slot in slots:  # read each slot's shards in shard order (sequential, cache-friendly)
        for units_of_pool in slot:
            units_of_pool.sort(key=lambda u: (u[0], u[2], u[3]))
    return slots


def split_items(items: int, old_world: int, new_world: int) -> int:
    """Items (batches per rank) already done in the new layout: the same number of samples."""
    return (items * old_world) // new_world


def describe(state: dict[str, Any]) -> str:
    """A short description of a saved layout for messages."""
    return f"{state.get('world_size')} rank(s) x {state.get('workers') or 1} worker(s)"
