"""The plan of a call: which algorithm and parameters run a problem on a device, built.

In order: an algorithm forced by use_algorithm(); a tuned entry (the store: the user's cache,
then shipped databases; in mode 'on' an untuned problem is tuned here, at its first use);
else the algorithms' heuristic. A plan is memoised per context (held weakly) and per
(problem, operation, epilogue, device, tuning mode, Winograd opt-in, forced algorithm,
store state), so a repeated call is one dict look-up. Built launches are shared by every
problem whose kernels have the same specialisation (Algorithm.specialisation: the rendered
constants, never the batch size), so one build serves every batch size that chose the same
configuration.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import pyopencl as cl

from . import algorithms, options, search, store
from .algorithms.base import freeze
from .capabilities import device_info
from .programs import ContextMemo

_plans = ContextMemo()
_launches = ContextMemo()


def plan(problem, queue, operation="forward", epilogue=()) -> algorithms.Launch:
    """The Launch of an operation ('forward', 'input_grad', 'weight_grad') of problem.
    epilogue: the forward's fused extras as (name, value) pairs (activation, has_residual);
    they do not change the choice of configuration, only what the kernel does at its end."""
    table = _plans.table(queue.context)
    key = (problem, operation, epilogue, queue.device, options.tuning_mode(),
           options.allow_winograd(), options.forced(operation), store.state())
    launch = table.get(key)
    if launch is None:
        launch = table[key] = _make(problem, queue, operation, dict(epilogue))
    return launch


def _make(problem, queue, operation, epilogue):
    info = device_info(queue.device)
    forced = options.forced(operation)
    if forced is not None:
        algorithm, config = forced_config(forced, problem, info)
        return _build(algorithm, problem, queue, config, epilogue)
    if store.needs_tuning(problem, info, operation):
        search.log.info("tuning %s (CLCONV_TUNE=on)",
                        store.signature(problem, operation=operation))
        try:
            search.tune_problem(problem, queue, operation=operation)
        except OSError as err:      # the cache could not be written: run untuned, say why
            warnings.warn(f"clconv: could not record a tuning result ({err})",
                          store.TuningCacheWarning)
    algorithm, config = algorithms.choose(problem, info, operation)
    heuristic = lambda: _build(algorithm, problem, queue, config, epilogue)  # noqa: E731
    tuned = store.tuned_choice(problem, info, operation)
    if tuned is None:
        return heuristic()
    tuned_algorithm, tuned_config, path = tuned
    what = (f"the tuned {tuned_algorithm.name} {tuned_config} for "
            f"{store.signature(problem, operation=operation)} from {path}")
    try:
        launch = _build(tuned_algorithm, problem, queue, tuned_config, epilogue)
    except Exception as err:    # a cache is input from disk: any failure falls back
        _fallback_warning(what, "failed to build", err)
        return heuristic()
    return _falling_back(launch, heuristic, what)


def _fallback_warning(what, how, err):
    text = str(err).strip().splitlines()
    warnings.warn(f"clconv: {what} {how} here ({type(err).__name__}: "
                  f"{text[0][:200] if text else ''}); using the heuristic instead",
                  store.TuningCacheWarning, stacklevel=5)


def _falling_back(tuned, heuristic, what):
    """tuned, until it fails to enqueue (an OpenCL error at launch): from then on, with one
    warning, the heuristic's launch (made by heuristic())."""
    current = [tuned]

    def run(queue, inputs, output, batch, wait_for):
        try:
            return current[0](queue, inputs, output, batch, wait_for)
        except cl.Error as err:
            if current[0] is not tuned:
                raise
            _fallback_warning(what, "failed to launch", err)
            current[0] = heuristic()
            launch.algorithm, launch.config = current[0].algorithm, current[0].config
            return current[0](queue, inputs, output, batch, wait_for)
    launch = algorithms.Launch(run, tuned.algorithm, tuned.config)
    return launch


def _build(algorithm, problem, queue, config, epilogue):
    table = _launches.table(queue.context)
    key = (queue.device, freeze(config), algorithm.specialisation(problem, config, epilogue))
    launch = table.get(key)
    if launch is None:
        launch = table[key] = algorithm.build(problem, queue, config, strict=False,
                                              epilogue=epilogue)
    return launch


def chosen(problem, queue, operation="forward"):
    """(algorithm name, config) that plan() runs for problem: for reports and tests."""
    launch = plan(problem, queue, operation)
    return launch.algorithm, launch.config


# --- forcing an algorithm --------------------------------------------------------------------

@contextmanager
def use_algorithm(name, **params):
    """A block in which every call of the algorithm's operation runs algorithm `name`, with
    the given parameters and its heuristic default for the others (for experts, benchmarks
    and tests):

        with clconv.use_algorithm("implicit_gemm", tk=6, tw=8):
            y = clconv.conv2d(x, w, padding=1)

    Unknown names, parameters or values raise ValueError here; a configuration that the
    algorithm's constraints reject for a problem (or an algorithm that does not apply to it)
    raises ValueError at that call, naming the algorithm and the reason."""
    algorithm = algorithms.ALGORITHMS.get(name)
    if algorithm is None:
        raise ValueError(f"use_algorithm: name must be one of {sorted(algorithms.ALGORITHMS)}, "
                         f"got {name!r}")
    declared = {p.name: p for p in algorithm.params}
    for key, value in params.items():
        if key not in declared:
            raise ValueError(f"use_algorithm: {name} has no parameter {key!r} (its parameters: "
                             f"{', '.join(declared)})")
        if type(value) is not int or value not in declared[key].values:
            raise ValueError(f"use_algorithm: {name}'s {key} must be one of "
                             f"{declared[key].values}, got {value!r}")
    with options.forcing(algorithm.operation, (name, freeze(params))):
        yield


def forced_config(forced, problem, info):
    """(algorithm, config) of a forced (name, params) for problem, checked."""
    name, params = forced
    algorithm = algorithms.ALGORITHMS[name]
    if not algorithm.applies(problem):
        raise ValueError(f"use_algorithm: {name} does not apply to this problem ({problem})")
    config = dict(algorithm.default_config(problem, info), **dict(params))
    reason = algorithm.constraints(problem, info, config)
    if reason:
        raise ValueError(f"use_algorithm: {name} config {config} is invalid for this problem: "
                         f"{reason}")
    return algorithm, config


def forget():
    """Drop every plan and built launch (their kernels are rebuilt from pyopencl's cache on
    next use). Plans are keyed by every setting and the store's state, so this is needed
    only after a change clconv cannot see (for example, templates edited in place)."""
    _plans.clear()
    _launches.clear()
