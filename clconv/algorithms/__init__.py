"""The convolution algorithms and the choice of one for a problem on a device."""
from __future__ import annotations

from .base import Algorithm, Launch, Param
from .direct import Direct

ALGORITHMS = {a.name: a for a in (Direct(),)}


def choose(problem, info):
    """(algorithm, config) by heuristic: the first algorithm that applies, its default."""
    for algorithm in ALGORITHMS.values():
        if algorithm.applies(problem):
            return algorithm, algorithm.default_config(problem, info)
    raise ValueError(f"no algorithm applies to {problem}")


__all__ = ["ALGORITHMS", "Algorithm", "Launch", "Param", "choose"]
