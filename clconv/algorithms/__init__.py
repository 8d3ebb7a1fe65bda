"""The convolution algorithms and the choice of one for a problem on a device."""
from __future__ import annotations

from ..device import device_info
from .base import Algorithm, Launch, Param, index_type
from .direct import Direct

ALGORITHMS = {a.name: a for a in (Direct(),)}

_plans: dict = {}


def choose(problem, info):
    """(algorithm, config) by heuristic: the first algorithm that applies, its default."""
    for algorithm in ALGORITHMS.values():
        if algorithm.applies(problem):
            return algorithm, algorithm.default_config(problem, info)
    raise ValueError(f"no algorithm applies to {problem}")


def plan(problem, queue) -> Launch:
    """The ready launch for problem on queue's device; built once, then a dict look-up.
    Kernels take the batch size as an argument, so one launch serves every batch size (as
    long as its flat indices keep fitting the index type it was built with)."""
    key = (problem.with_batch(1), index_type(problem), queue.context, queue.device)
    launch = _plans.get(key)
    if launch is None:
        algorithm, config = choose(problem, device_info(queue.device))
        launch = _plans[key] = algorithm.build(problem, queue, config, strict=False)
    return launch


__all__ = ["ALGORITHMS", "Algorithm", "Launch", "Param", "choose", "plan"]
