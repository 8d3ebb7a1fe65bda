"""Autotuning: modes, the tuned choice for a problem, and the single tuning entry point.

Modes (CLCONV_TUNE, or set_mode()):
- off: heuristics only;
- cached (default): a tuned entry when one exists (the user's cache, else a shipped
  database), heuristics otherwise;
- on: like cached, but a problem missing from the user's cache is tuned at its first use
  (like cuDNN's benchmark mode), then remembered.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from .. import algorithms
from ..device import device_info, queue_for
from ..problem import Problem
from .cache import (TuningCacheWarning, _warn_once, cache_entries, cache_path, database_entries,
                    nearest, record, signature)
from .search import TuneResult, Tuner, Trial

MODES = ("off", "cached", "on")
DEFAULT_BUDGET = 20.0       # seconds per problem
log = logging.getLogger("clconv.autotune")
_mode = None                # set_mode()'s choice; None follows CLCONV_TUNE


def mode():
    """The tuning mode in force: set_mode()'s, else CLCONV_TUNE's, else 'cached'."""
    value = _mode or os.environ.get("CLCONV_TUNE") or "cached"
    if value not in MODES:
        raise ValueError(f"CLCONV_TUNE must be one of {MODES}, got {value!r}")
    return value


def set_mode(value):
    """Set the tuning mode for this process ('off', 'cached', 'on'); None: back to CLCONV_TUNE."""
    global _mode
    if value is not None and value not in MODES:
        raise ValueError(f"tuning mode must be one of {MODES} or None, got {value!r}")
    _mode = value       # plans are memoised per mode, so none needs forgetting


@contextmanager
def mode_set_to(value):
    """A block in which the tuning mode is value (then back to what it was)."""
    global _mode
    saved = _mode
    set_mode(value)
    try:
        yield
    finally:
        _mode = saved


def default_budget():
    """CLCONV_TUNE_BUDGET seconds per problem, else DEFAULT_BUDGET."""
    text = os.environ.get("CLCONV_TUNE_BUDGET")
    if not text:
        return DEFAULT_BUDGET
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise ValueError(f"CLCONV_TUNE_BUDGET must be a positive number of seconds, got {text!r}")
    return value


def check_budget(budget):
    if budget is None:
        return default_budget()
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
    return float(budget)


def tuned_choice(problem, info, operation="forward"):
    """(algorithm, config, source) from the cache or a database, or None (mode 'off', or
    nothing tuned for this problem). An entry that no longer fits is ignored with a warning."""
    if mode() == "off":
        return None
    for source, entries in (("cache", cache_entries(info)), ("database", database_entries(info))):
        entry = nearest(entries, problem, operation)
        if entry is None:
            continue
        algorithm = algorithms.ALGORITHMS.get(entry["algorithm"])
        config = entry["config"]
        names = algorithm and {p.name for p in algorithm.params}
        reason = ("unknown algorithm" if algorithm is None else
                  f"not a {operation} algorithm" if algorithm.operation != operation else
                  "does not apply" if not algorithm.applies(problem) else
                  "parameters differ" if set(config) != names else
                  algorithm.constraints(problem, info, config))
        if reason:
            where = cache_path(info) if source == "cache" else "a tuning database"
            _warn_once(where, f"entry for {signature(problem, operation=operation)}: {reason}")
            continue
        return algorithm, dict(config), source
    return None


def needs_tuning(problem, info, operation="forward"):
    """In mode 'on': whether operation on problem is missing from the user's own cache."""
    return (mode() == "on"
            and signature(problem, operation=operation) not in cache_entries(info))


def tune_problem(problem, queue, budget=None, remember=True, progress=None,
                 operation="forward"):
    """Tune one operation of a Problem on queue's device; record the winner in the cache
    (remember=True)."""
    budget = check_budget(budget)
    result = Tuner(problem, queue, operation=operation).run(budget, progress=progress)
    if result.best is None:
        log.warning("no candidate for %s gave the right answer; keeping the heuristic",
                    result.signature)
    elif remember:
        record(device_info(queue.device), {result.signature: result.entry()})
    return result


def tune(target, input_shape=None, *, budget=None, device=None, queue=None, remember=True,
         progress=None, operation="forward"):
    """Tune convolutions on a device and remember the winners; returns the TuneResult(s).

    target: a clconv.Problem, a clconv.Conv2d with input_shape ((N, C, H, W) or (C, H, W)),
    or a list of these (each item a Problem or a (module, input_shape) pair). budget: seconds
    per problem (default CLCONV_TUNE_BUDGET, else 20). operation: 'forward', 'input_grad'
    or 'weight_grad' (the gradients of the convolution with respect to input and weight).
    """
    if isinstance(target, (list, tuple)) and not _is_shape(input_shape):
        return [tune(*(t if isinstance(t, tuple) else (t,)), budget=budget, device=device,
                     queue=queue, remember=remember, progress=progress, operation=operation)
                for t in target]
    algorithms.for_operation(operation)         # a ValueError for an unknown one
    budget = check_budget(budget)
    if isinstance(target, Problem):
        problem = target
    elif hasattr(target, "problem_for"):
        if input_shape is None:
            raise ValueError("tune(module) needs input_shape, the (N, C, H, W) the module sees")
        problem = target.problem_for(input_shape)
        queue = queue or getattr(target, "queue", None)
    else:
        raise TypeError("target must be a clconv.Problem, a clconv.Conv2d (with input_shape) "
                        f"or a list of them, got {type(target).__name__}")
    return tune_problem(problem, queue_for(device, queue), budget, remember, progress,
                        operation)


def _is_shape(value):
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value)


__all__ = ["MODES", "TuneResult", "Trial", "Tuner", "TuningCacheWarning", "mode", "set_mode",
           "tune", "tune_problem", "tuned_choice", "needs_tuning", "default_budget"]
