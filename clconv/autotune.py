"""Autotuning's one entry point, clconv.tune(), and the names around it.

The modes (off, cached, on) and the budget are process settings (clconv.options); the
tuned entries live in the store (clconv.store); the search is clconv.search; planning uses
them all (clconv.planner). `clconv tune` tunes whole layer suites (clconv.tune_suite).
"""
from __future__ import annotations

from . import algorithms
from .device import queue_for
from .options import (DEFAULT_BUDGET, TUNING_MODES as MODES, check_budget, default_budget,
                      set_tune_mode as set_mode, tuning_mode as mode,
                      tuning_mode_set_to as mode_set_to)
from .problem import Problem
from .search import TuneResult, Trial, Tuner, tune_problem
from .store import TuningCacheWarning, needs_tuning, tuned_choice


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


__all__ = ["MODES", "DEFAULT_BUDGET", "TuneResult", "Trial", "Tuner", "TuningCacheWarning",
           "mode", "set_mode", "mode_set_to", "tune", "tune_problem", "tuned_choice",
           "needs_tuning", "default_budget", "check_budget"]
