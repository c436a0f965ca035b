"""Packing for ``python -m datagen size``: actors holding fractions of a GPU onto whole GPUs, and GPUs
and multi-GPU actors onto nodes, first-fit decreasing, as Ray places fractional resource requests.
"""

from __future__ import annotations

from collections.abc import Iterable

from .measurement import SizingError

_EPS = 1e-9  # float slack: three actors of 1/3 GPU fill one GPU


def _first_fit_decreasing(groups: Iterable[tuple[float, int]], capacity: float) -> list[float]:
    """``count`` items of each ``size`` into bins of ``capacity``; returns each bin's free space."""
    free: list[float] = []
    for size, count in sorted(groups, reverse=True):
        for i in range(len(free)):
            if count == 0:
                break
            k = min(count, int((free[i] + _EPS) // size))
            free[i] -= k * size
            count -= k
        per_bin = int((capacity + _EPS) // size)
        while count > 0:
            k = min(count, per_bin)
            free.append(capacity - k * size)
            count -= k
    return free


def pack(actors: Iterable[tuple[float, int]], gpus_per_node: int) -> tuple[int, int]:
    """``(GPUs, nodes)`` for ``count`` actors of ``num_gpus`` each, per ``(num_gpus, count)`` pair.

    Actors with a fraction of a GPU share whole GPUs (any pools); an actor with n >= 1 GPUs holds n
    GPUs of one node.
    """
    if gpus_per_node < 1:
        raise SizingError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    whole: dict[float, int] = {}
    fractional: dict[float, int] = {}
    for g, n in actors:
        if g <= 0 or n <= 0:
            continue
        if g > gpus_per_node + _EPS:
            raise SizingError(f"an actor with {g:g} GPUs does not fit on a node of {gpus_per_node} GPUs")
        target = whole if g >= 1 - _EPS else fractional
        target[g] = target.get(g, 0) + n
    shared = len(_first_fit_decreasing(fractional.items(), 1.0))
    items = [*whole.items(), (1.0, shared)] if shared else list(whole.items())
    nodes = len(_first_fit_decreasing(items, float(gpus_per_node)))
    return round(sum(g * n for g, n in whole.items())) + shared, nodes
