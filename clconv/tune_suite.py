"""`clconv tune`: tune a layer suite on one device, with a progress bar and a before/after
table (heuristic default vs tuned), and remember the winners (in the store)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import algorithms
from .capabilities import device_info
from .search import Tuner
from .store import (CacheWriteError, cache_entries, cache_path, check_writable, entry_problem,
                    export_database, record, signature, usable)
from .suites import describe, geomean, layer_problem, select_layers


@dataclass
class SuiteRow:
    name: str
    shape: str
    default_ms: float | None
    tuned_ms: float | None
    choice: str
    tried: int
    seconds: float
    how: str            # "tuned", "cached" (already in the cache: re-measured) or "failed"

    @property
    def speedup(self):
        return self.default_ms / self.tuned_ms if self.default_ms and self.tuned_ms else None


class ProgressBar:
    """On a terminal, tqdm's bar with the current layer and its best time so far; on any
    other stream (a log, CI) one line per layer, where redraws would only add noise."""

    def __init__(self, total, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, file=stream, disable=not self.live, leave=False,
                        bar_format="{bar:20} {desc}", dynamic_ncols=True)

    def layer(self, index, name):
        self.index, self.name = index, name
        if self.live:
            self.bar.update(index - 1 - self.bar.n)
            self.bar.set_description_str(f"[{index}/{self.total}] {name} ...")
        else:
            self.stream.write(f"[{index}/{self.total}] {name} ...\n")
            self.stream.flush()

    def update(self, result, budget):
        if self.live:
            best = f"best {result.best.ms:.3f} ms" if result.best else "no valid candidate yet"
            self.bar.set_description_str(
                f"[{self.index}/{self.total}] {self.name}: {len(result.trials)} tried, {best}, "
                f"{result.seconds:.0f}/{budget:.0f} s")

    def clear(self):
        """Wipe the bar so that other output starts at its column 0 (tqdm redraws it)."""
        self.bar.clear()

    def close(self):
        self.bar.close()


def tune_layer(problem, queue, budget, retune, progress, operation="forward"):
    """One suite row: tune an operation of problem, or re-measure its cached entry against
    the default."""
    info = device_info(queue.device)
    cached = cache_entries(info).get(signature(problem, operation=operation))
    tuner = Tuner(problem, queue, operation=operation)
    how = "tuned"
    if cached is not None and usable(cached, problem, info, operation) and not retune:
        algorithm = algorithms.ALGORITHMS[cached["algorithm"]]   # known: cache_entries says
        reason = entry_problem(algorithm, cached["config"], problem, info, operation)
        if reason is None:
            default_alg, default_config = algorithms.choose(problem, info, operation)
            default = tuner.evaluate(default_alg, default_config)
            mine = tuner.evaluate(algorithm, cached["config"])
            return SuiteRow("", describe(problem), default.ms, mine.ms, mine.describe(), 0,
                            0.0, "cached" if mine.ok else f"cached entry {mine.status}")
        how, retune = f"tuned again: the cached entry was invalid, {reason}", True
    result = tuner.run(budget, progress=progress)
    if result.best is None:
        return SuiteRow("", describe(problem), result.default.ms, None, "-",
                        len(result.trials), result.seconds, "failed")
    record(info, {result.signature: result.entry()}, replace=retune)
    return SuiteRow("", describe(problem), result.default.ms, result.best.ms,
                    result.best.describe(), len(result.trials), result.seconds, how)


HEADER = (f"{'layer':<42} {'default ms':>10} {'tuned ms':>9} {'speed-up':>8} {'tried':>5} "
          f"{'s':>5}  chosen")
RULE = "-" * (len(HEADER) + 30)


def format_row(r):
    return (f"{r.name:<42} {_ms(r.default_ms):>10} {_ms(r.tuned_ms):>9} "
            f"{(f'{r.speedup:.2f}x' if r.speedup else '-'):>8} {r.tried:>5} "
            f"{r.seconds:5.0f}  {r.choice}" + ("" if r.how == "tuned" else f" ({r.how})"))


def check_export_path(export):
    """Raise CacheWriteError unless a database can be written at export (before tuning)."""
    path = Path(export)
    if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise CacheWriteError(f"cannot write the database {path}: "
                              + ("a directory is in its place" if path.is_dir() else
                                 f"{path.parent} is not a writable directory"))


def _ms(value):
    return "-" if value is None else f"{value:.3f}"


def main(queue, suite=None, only=None, batch=None, budget=20.0, retune=False, export=None,
         out=sys.stdout, err=sys.stderr, backward=False):
    layers = select_layers(suite, only)
    info = device_info(queue.device)
    check_writable(info)
    if export:
        check_export_path(export)
    operations = ("forward", "input_grad", "weight_grad") if backward else ("forward",)
    jobs = [(layer, op) for layer in layers for op in operations]
    print(f"clconv tune: {info.name} ({info.platform}, driver {info.driver_version}); "
          f"suite {suite or 'standard'}, {len(layers)} layers ({', '.join(operations)}), "
          f"budget {budget:g} s each", file=out, flush=True)
    print(f"{HEADER}\n{RULE}", file=out, flush=True)
    bar = ProgressBar(len(jobs), err)
    rows, start = [], time.perf_counter()
    for i, (layer, operation) in enumerate(jobs, 1):
        name = layer["name"] if batch is None else f"{layer['name']}@n{batch}"
        name = name if operation == "forward" else f"{name} {operation}"
        bar.layer(i, name)
        problem = layer_problem(layer, batch)
        row = tune_layer(problem, queue, budget, retune, lambda r: bar.update(r, budget),
                         operation)
        row.name = name
        rows.append(row)
        bar.clear()
        print(format_row(row), file=out, flush=True)
    bar.close()
    print(RULE, file=out)
    speedups = [r.speedup for r in rows if r.speedup]
    mean = geomean(speedups)
    print(f"geometric-mean speed-up of tuned over default: "
          f"{f'{mean:.2f}x' if mean else '-'} over {len(speedups)} rows; tuning took "
          f"{time.perf_counter() - start:.0f} s", file=out)
    print(f"cache: {cache_path(info)} ({len(cache_entries(info))} problems)", file=out)
    if export:
        count = export_database(info, export)
        print(f"exported {count} entries to {export}", file=out)
    return rows, all(r.how in ("tuned", "cached") for r in rows)
