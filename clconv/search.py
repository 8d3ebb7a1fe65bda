"""The tuner: for one problem on one device, find the fastest correct configuration.

Candidates are every algorithm that applies and suits the device, with every combination of
its declared parameter values that its constraints accept on this device. A small space is
tried exhaustively; a large one by random sampling, then hill-climbing over neighbouring parameter
values around the best so far (and sampling again when that is exhausted). Each candidate is
built, run once (warm-up; its output, written over NaNs, must match the NumPy reference or it
is out), then timed by OpenCL profiling events: the median of the repeats. A candidate that
fails to build or launch is recorded and skipped. The heuristic default is always measured
first, so even a tiny budget gives a result and a baseline. At the end the best few and the
default are timed again in interleaved rounds, so that a candidate lucky in a quiet moment of
a shared machine does not win on that luck: the winner is the best median of those rounds.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from . import algorithms, options, store
from .capabilities import device_info
from .limits import check_device_limits
from .programs import BuildError
from .reference import Check, test_case
from .store import signature

EXHAUSTIVE_LIMIT = 64           # spaces up to this size are tried in full
SAMPLING_SHARE = 0.4            # of the budget, spent on random samples before refining
EARLY_STOP = 2.0                # stop timing a candidate this many times slower than the best
CONFIRM_SHARE = 0.15            # of the budget, kept to re-time the finalists side by side
CONFIRM_TOP = 3                 # finalists (plus the default)
log = logging.getLogger("clconv.autotune")


@dataclass
class Trial:
    algorithm: str
    config: dict
    ms: float | None = None     # median kernel time; None when it did not run or was wrong
    status: str = "ok"          # ok | build failed | launch failed | wrong result
    detail: str = ""

    @property
    def ok(self):
        return self.status == "ok"

    def describe(self):
        params = " ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.algorithm} {params}"


@dataclass
class TuneResult:
    problem: object
    operation: str
    default: Trial
    best: Trial | None          # None only if no candidate produced the right answer
    trials: list = field(default_factory=list)
    space: int = 0
    strategy: str = ""
    seconds: float = 0.0
    algorithms: tuple | None = None     # the candidates' algorithms' names (None: unknown)

    @property
    def signature(self):
        return signature(self.problem, operation=self.operation)

    @property
    def speedup(self):
        if self.best is None or not self.default.ok:
            return None
        return self.default.ms / self.best.ms

    def entry(self):
        """The cache entry of the winner."""
        searched = {} if self.algorithms is None else {"algorithms": sorted(self.algorithms)}
        return {"algorithm": self.best.algorithm, "config": self.best.config,
                "sources": store.sources_of(self.best.algorithm), **searched,
                "ms": round(self.best.ms, 6),
                "default_ms": round(self.default.ms, 6) if self.default.ok else None,
                "batch": self.problem.batch, "candidates_tried": len(self.trials),
                "space": self.space, "tuning_seconds": round(self.seconds, 1),
                "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def report(self):
        """What was tried, best first: one line per candidate."""
        ranked = sorted(self.trials, key=lambda t: (not t.ok, t.ms or 0))
        lines = [f"{self.signature}: tried {len(self.trials)} (the default and a space of "
                 f"{self.space}, {self.strategy}) in {self.seconds:.1f} s"]
        for t in ranked:
            result = f"{t.ms:9.3f} ms" if t.ok else f"{t.status}: {t.detail}"
            lines.append(f"  {t.describe():<44} {result}")
        return "\n".join(lines)


def _key(algorithm_name, config):
    return algorithm_name, tuple(sorted(config.items()))


class Tuner:
    """Tunes one operation of a problem on one queue's device. Test data and the reference
    result are made once; evaluate() measures any (algorithm, config)."""

    def __init__(self, problem, queue, candidates_from=None, repeats=7, seed=0,
                 operation="forward"):
        check_device_limits(problem, queue.device)
        self.problem, self.queue, self.repeats = problem, queue, repeats
        self.operation = operation
        self.info = device_info(queue.device)
        pool = candidates_from or [a for a in algorithms.for_operation(operation)
                                   if a.suits(self.info)]
        self.algorithms = [a for a in pool if a.applies(problem)]
        operands, out_shape, reference = test_case(problem, operation,
                                                   np.random.default_rng(seed))
        self.check = Check(problem, reference, *operands)
        self.inputs = [cl_array.to_device(queue, a) for a in operands]
        self.poison = np.full(out_shape, np.nan, problem.numpy_dtype)   # unwritten stays NaN
        self.y = cl_array.empty(queue, out_shape, problem.numpy_dtype)
        self.best_ms = math.inf
        self.launches = {}              # candidate key -> built launch, for the final rounds

    def candidates(self):
        """Every valid (algorithm, config) for this problem on this device."""
        space = []
        for algorithm in self.algorithms:
            names = [p.name for p in algorithm.params]
            for values in itertools.product(*(p.values for p in algorithm.params)):
                config = dict(zip(names, values))
                if algorithm.constraints(self.problem, self.info, config) is None:
                    space.append((algorithm, config))
        return space

    def _launch(self, launch):
        return launch.timed(self.queue, [(a.base_data, 0) for a in self.inputs],
                            (self.y.base_data, 0), self.problem.batch)

    def evaluate(self, algorithm, config):
        """Build, check and time one candidate; never raises for a bad candidate."""
        trial = Trial(algorithm.name, dict(config))
        try:
            launch = algorithm.build(self.problem, self.queue, config, strict=True)
        except (BuildError, ValueError, cl.Error) as err:
            trial.status, trial.detail = "build failed", _first_line(err)
            return trial
        try:
            self.y.set(self.poison)
            first = self._launch(launch)
        except cl.Error as err:
            trial.status, trial.detail = "launch failed", _first_line(err)
            return trial
        error = self.check.error(self.y.get())
        if not self.check.passes(error):
            trial.status, trial.detail = "wrong result", f"max error {error:.2e} of the bound"
            return trial
        times = [first] if first > EARLY_STOP * self.best_ms else []
        while len(times) < self.repeats:
            times.append(self._launch(launch))
            if len(times) >= 2 and min(times) > EARLY_STOP * self.best_ms:
                trial.detail = "clearly slower: timing stopped early"
                break
        trial.ms = float(np.median(times))
        self.best_ms = min(self.best_ms, trial.ms)
        self.launches[_key(algorithm.name, config)] = launch
        return trial

    def run(self, budget, progress=None, seed=0):
        """Search within budget seconds (counted from the call); the default always runs.
        progress(result) is called after each candidate."""
        start = time.perf_counter()
        deadline = start + (1 - CONFIRM_SHARE) * budget
        default_alg, default_config = algorithms.choose(self.problem, self.info,
                                                        self.operation)
        space = self.candidates()
        result = TuneResult(self.problem, self.operation, None, None, space=len(space),
                            algorithms=tuple(a.name for a in self.algorithms))
        seen = set()

        def try_one(algorithm, config):
            seen.add(_key(algorithm.name, config))
            trial = self.evaluate(algorithm, config)
            result.trials.append(trial)
            if trial.ok and (result.best is None or trial.ms < result.best.ms):
                result.best = trial
            result.seconds = time.perf_counter() - start
            if progress:
                progress(result)
            return trial

        result.default = try_one(default_alg, default_config)
        by_key = {_key(a.name, c): (a, c) for a, c in space}
        order = list(by_key)
        random.Random(seed).shuffle(order)
        if len(space) <= EXHAUSTIVE_LIMIT:
            result.strategy = "exhaustive"
            for key in order:
                if time.perf_counter() >= deadline:
                    break
                if key not in seen:
                    try_one(*by_key[key])
        else:
            result.strategy = "sampled + local refinement"
            samples = iter(order)
            sampling_until = start + SAMPLING_SHARE * budget
            while time.perf_counter() < deadline and len(seen) < len(by_key):
                if time.perf_counter() < sampling_until or not self._refine(
                        result, by_key, seen, try_one, deadline):
                    key = next((k for k in samples if k not in seen), None)
                    if key is None:
                        break
                    try_one(*by_key[key])
        self._confirm(result, start + budget)
        result.seconds = time.perf_counter() - start
        return result

    def _confirm(self, result, deadline):
        """Re-time the finalists and the default in interleaved rounds (at least two, at most
        `repeats`); their medians there replace their first ones and decide the winner."""
        ranked = sorted((t for t in result.trials if t.ok), key=lambda t: t.ms)
        finalists = ranked[:CONFIRM_TOP]
        if result.default.ok and result.default not in finalists:
            finalists.append(result.default)
        if len(finalists) < 2:
            return
        launches = [self.launches[_key(t.algorithm, t.config)]
                    for t in finalists]
        samples = [[] for _ in finalists]
        for round_ in range(self.repeats):
            if round_ >= 2 and time.perf_counter() >= deadline:
                break
            for times, launch in zip(samples, launches):
                times.append(self._launch(launch))
        for trial, times in zip(finalists, samples):
            trial.ms = float(np.median(times))
            trial.detail = f"final rounds: median of {len(times)}"
        result.best = min(finalists, key=lambda t: t.ms)

    def _refine(self, result, by_key, seen, try_one, deadline):
        """Hill-climb from the best: try its untried neighbours (one parameter moved one step
        in its list of values). False when the best has no untried neighbour left."""
        names = {a.name: a for a in self.algorithms}
        ranked = sorted((t for t in result.trials if t.ok and t.algorithm in names),
                        key=lambda t: t.ms)
        if not ranked:
            return False
        anchor, algorithm = ranked[0], names[ranked[0].algorithm]
        tried_any = False
        for param in algorithm.params:
            values = list(param.values)
            if anchor.config.get(param.name) not in values:
                continue
            here = values.index(anchor.config[param.name])
            for step in (-1, 1):
                if not 0 <= here + step < len(values):
                    continue
                config = dict(anchor.config, **{param.name: values[here + step]})
                key = _key(algorithm.name, config)
                if key in by_key and key not in seen and time.perf_counter() < deadline:
                    trial = try_one(*by_key[key])
                    tried_any = True
                    if trial.ok and trial.ms < anchor.ms:
                        return True         # moved: climb on from the new best
        return tried_any


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def tune_problem(problem, queue, budget=None, remember=True, progress=None,
                 operation="forward"):
    """Tune one operation of a Problem on queue's device; record the winner in the cache
    (remember=True)."""
    budget = options.check_budget(budget)
    result = Tuner(problem, queue, operation=operation).run(budget, progress=progress)
    if result.best is None:
        log.warning("no candidate for %s gave the right answer; keeping the heuristic",
                    result.signature)
    elif remember:
        store.record(device_info(queue.device), {result.signature: result.entry()})
    return result
