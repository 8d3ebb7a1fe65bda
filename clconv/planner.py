"""The plan of a call: which algorithm and parameters run a problem on a device, built.

Tuned entries come first (autotune: the user's cache, then shipped databases; in mode 'on' an
untuned problem is tuned here, at its first use), else the algorithm's heuristic. A plan is
memoised per (problem, context, device, tuning mode, Winograd opt-in), so a repeated call is
one dict look-up. Kernels take the batch size as an argument, so a built launch is shared by
every batch size that chose the same configuration (while its indices fit the same integer
type).
"""
from __future__ import annotations

import warnings

import pyopencl as cl

from . import algorithms, autotune, options
from .device import device_info
from .programs import BuildError

_plans: dict = {}
_launches: dict = {}


def plan(problem, queue, operation="forward", epilogue=()) -> algorithms.Launch:
    """The Launch of an operation ('forward', 'input_grad', 'weight_grad') of problem.
    epilogue: the forward's fused extras as (name, value) pairs (activation, has_residual);
    they do not change the choice of configuration, only what the kernel does at its end."""
    key = (problem, operation, epilogue, queue.context, queue.device, autotune.mode(),
           options.allow_winograd())
    launch = _plans.get(key)
    if launch is None:
        launch = _plans[key] = _make(problem, queue, operation, dict(epilogue))
    return launch


def _make(problem, queue, operation, epilogue):
    info = device_info(queue.device)
    if autotune.needs_tuning(problem, info, operation):
        autotune.log.info("tuning %s (CLCONV_TUNE=on)",
                          autotune.signature(problem, operation=operation))
        try:
            autotune.tune_problem(problem, queue, operation=operation)
        except OSError as err:      # the cache could not be written: run untuned, say why
            warnings.warn(f"clconv: could not record a tuning result ({err})",
                          autotune.TuningCacheWarning)
    tuned = autotune.tuned_choice(problem, info, operation)
    if tuned is not None:
        algorithm, config, source = tuned
        try:
            return _build(algorithm, problem, queue, config, epilogue)
        except (BuildError, ValueError, cl.Error) as err:
            warnings.warn(f"clconv: the tuned {algorithm.name} {config} from the {source} "
                          f"failed here ({err}); using the heuristic", autotune.TuningCacheWarning)
    algorithm, config = algorithms.choose(problem, info, operation)
    return _build(algorithm, problem, queue, config, epilogue)


def _build(algorithm, problem, queue, config, epilogue):
    key = (algorithm.name, tuple(sorted(config.items())), tuple(sorted(epilogue.items())),
           problem.with_batch(1), algorithm.constants(problem, config)["idx_t"], queue.context,
           queue.device)
    launch = _launches.get(key)
    if launch is None:
        launch = _launches[key] = algorithm.build(problem, queue, config, strict=False,
                                                  epilogue=epilogue)
    return launch


def chosen(problem, queue, operation="forward"):
    """(algorithm name, config) that plan() runs for problem: for reports and tests."""
    launch = plan(problem, queue, operation)
    return launch.algorithm, launch.config


def forget():
    """Drop every plan (after the tuning cache or the mode changed)."""
    _plans.clear()
