"""The autotuner: search, correctness gate, failure handling, the cache file and the modes.

Problems are tiny and budgets short: these tests prove behaviour, not speed.
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pyopencl as cl
import pytest

import clconv
from clconv import algorithms, autotune, planner, programs, search
from clconv.algorithms import ALGORITHMS, Param, for_operation
from clconv.algorithms.direct import Direct
from clconv import store as cache
from clconv.search import Tuner
from clconv.problem import make_problem

from reference import (assert_matches, conv2d_input_grad_ref, conv2d_weight_grad_ref,
                       conv2d_input_grad_abs_bound, conv2d_weight_grad_abs_bound)


def problem_of(n=1, cin=4, h=9, w=10, cout=6, k=3, stride=1, padding=1, dilation=1, groups=1,
               padding_mode="zeros", bias=False, dtype=np.float32):
    return make_problem((n, cin, h, w), dtype, (cout, cin // groups, k, k), dtype,
                        (cout,) if bias else None, dtype if bias else None, stride, padding,
                        dilation, groups, padding_mode)[0]


def conv_args(p):
    pt, pb, pl, pr = p.pad
    assert (pt, pl) == (pb, pr)
    return dict(stride=p.stride, padding=(pt, pl), dilation=p.dilation, groups=p.groups,
                padding_mode=p.padding_mode)


def run_and_check(p, queue, rng):
    """clconv.conv2d on random data for problem p, checked against the test reference."""
    dtype = p.numpy_dtype
    x = rng.standard_normal(p.input_shape).astype(dtype)
    w = rng.standard_normal(p.weight_shape).astype(dtype)
    b = rng.standard_normal(p.out_channels).astype(dtype) if p.has_bias else None
    y = clconv.conv2d(x, w, b, queue=queue, **conv_args(p))
    assert_matches(y, x, w, b, **conv_args(p))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, empty cache for one test, the default mode, and no shipped databases."""
    monkeypatch.setenv("CLCONV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "databases_dir", lambda: tmp_path / "no-databases")
    autotune.set_mode(None)
    yield tmp_path / "cache"
    autotune.set_mode(None)


@pytest.fixture
def info(queue):
    return clconv.device_info(queue.device)


def entry(config, batch=1, ms=1.0, algorithm="direct"):
    return {"algorithm": algorithm, "config": config, "ms": ms, "batch": batch}


# A valid config that is not the heuristic's choice for problem_of()'s defaults.
OTHER = {"tk": 3, "tw": 2, "lx": 2, "ly": 1, "lz": 1, "ukw": 1}


def test_other_is_not_the_default(queue, info):
    _, default = clconv.algorithms.choose(problem_of(), info)
    assert default != OTHER
    assert ALGORITHMS["direct"].constraints(problem_of(), info, OTHER) is None


# --- cache ---------------------------------------------------------------------------------

def test_round_trip_file_and_plan(cache_dir, queue, info, rng):
    p = problem_of()
    path = cache.record(info, {cache.signature(p): entry(OTHER)})
    assert path.parent.parent == cache_dir and path.suffix == ".json"
    data = json.loads(path.read_text())
    assert data["format"] == "clconv-tuning-cache"
    assert data["device"]["driver_version"] == info.driver_version
    assert data["entries"][cache.signature(p)]["sources"] == cache.sources_of("direct")
    assert data["entries"][cache.signature(p)]["config"] == OTHER
    assert planner.chosen(p, queue) == ("direct", OTHER)
    run_and_check(p, queue, rng)


def test_nearest_batch_entry_serves_other_batches(cache_dir, queue, info):
    tuned = dict(OTHER, tk=2)
    cache.record(info, {cache.signature(problem_of(n=2)): entry(OTHER, batch=2),
                        cache.signature(problem_of(n=16)): entry(tuned, batch=16)})
    assert planner.chosen(problem_of(n=3), queue)[1] == OTHER
    assert planner.chosen(problem_of(n=12), queue)[1] == tuned
    assert planner.chosen(problem_of(cout=7), queue)[1] != OTHER    # another layer


def test_merge_keeps_the_faster_entry_unless_replacing(cache_dir, info):
    sig = cache.signature(problem_of())
    cache.record(info, {sig: entry(OTHER, ms=1.0)})
    cache.record(info, {sig: entry(dict(OTHER, tk=1), ms=2.0)})
    assert cache.cache_entries(info)[sig]["config"] == OTHER
    cache.record(info, {sig: entry(dict(OTHER, tk=1), ms=2.0)}, replace=True)
    assert cache.cache_entries(info)[sig]["config"]["tk"] == 1


@pytest.mark.parametrize("content", [
    "{ this is not json", '{"format": "clconv-tuning-cache", "version": 1, "entr',
    '{"hello": "world"}', "[1, 2, 3]", b"\xff\xfe\x00garbage",
    '{"format": "clconv-tuning-cache", "version": 1, "entries": {"x": 5}}',
], ids=["garbage", "truncated", "foreign", "list", "binary", "bad-entries"])
def test_corrupt_file_warns_once_is_ignored_then_rebuilt(cache_dir, queue, info, rng, content):
    path = cache.cache_path(info)
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    p = problem_of()
    with pytest.warns(clconv.TuningCacheWarning, match="ignoring tuning file"):
        run_and_check(p, queue, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # only once
        planner.forget()
        run_and_check(p, queue, rng)
        cache.record(info, {cache.signature(p): entry(OTHER)})
    assert json.loads(path.read_text())["entries"][cache.signature(p)]["config"] == OTHER
    assert planner.chosen(p, queue)[1] == OTHER


def test_changed_driver_version_invalidates(cache_dir, queue, info):
    p = problem_of()
    cache.record(info, {cache.signature(p): entry(OTHER)})
    updated = dataclasses.replace(info, driver_version=info.driver_version + "-updated")
    assert cache.cache_path(updated) != cache.cache_path(info)
    assert cache.cache_entries(updated) == {}
    assert autotune.tuned_choice(p, updated) is None
    assert cache.other_cache_files(updated) == [cache.cache_path(info)]
    # A file at the right place whose header names another driver is not trusted either.
    data = json.loads(cache.cache_path(info).read_text())
    data["device"]["driver_version"] = "0.0-old"
    cache.cache_path(info).write_text(json.dumps(data))
    with pytest.warns(clconv.TuningCacheWarning, match="driver_version"):
        assert autotune.tuned_choice(p, info) is None


def test_changed_kernel_sources_invalidate(cache_dir, info, monkeypatch):
    p = problem_of()
    cache.record(info, {cache.signature(p): entry(OTHER)})
    assert autotune.tuned_choice(p, info) is not None
    monkeypatch.setattr(cache, "sources_of", lambda name: "0123456789abcdef")
    assert autotune.tuned_choice(p, info) is None


def test_entry_that_no_longer_fits_is_ignored_with_a_warning(cache_dir, queue, info, rng):
    p = problem_of()
    cache.record(info, {cache.signature(p): entry(dict(OTHER, tk=99))})
    with pytest.warns(clconv.TuningCacheWarning, match="tk must be"):
        assert autotune.tuned_choice(p, info) is None
    planner.forget()
    with pytest.warns(clconv.TuningCacheWarning):
        run_and_check(problem_of(n=2), queue, rng)


def test_unwritable_cache_dir(cache_dir, tmp_path, monkeypatch, queue, info, rng):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CLCONV_CACHE_DIR", str(blocker))
    with pytest.raises(OSError):                 # explicit recording says so
        cache.record(info, {"x n1": entry(OTHER)})
    monkeypatch.setenv("CLCONV_TUNE", "on")      # tuning at first use warns and runs on
    monkeypatch.setenv("CLCONV_TUNE_BUDGET", "0.5")
    with pytest.warns(clconv.TuningCacheWarning, match="could not record"):
        run_and_check(problem_of(cout=2), queue, rng)


RECORDER = textwrap.dedent("""
    import sys, clconv
    from clconv import store as cache
    info = clconv.device_info(clconv.queue_for().device)
    tag = sys.argv[1]
    for i in range(40):
        cache.record(info, {f"{tag} {i} n1": {"algorithm": "direct", "config": {}, "ms": 1.0,
                                              "batch": 1}})
""")


def test_concurrent_writers_lose_nothing(cache_dir, info):
    procs = [subprocess.Popen([sys.executable, "-c", RECORDER, tag]) for tag in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    entries = json.loads(cache.cache_path(info).read_text())["entries"]
    assert set(entries) == {f"{t} {i} n1" for t in "ab" for i in range(40)}


TUNER = textwrap.dedent("""
    import sys, numpy as np, clconv
    from clconv.problem import make_problem
    cout = int(sys.argv[1])
    p = make_problem((1, 4, 8, 8), np.float32, (cout, 4, 3, 3), np.float32, None, None, 1, 1,
                     1, 1, "zeros")[0]
    assert clconv.tune(p, budget=3).best is not None
""")


def test_two_processes_tuning_at_once_keep_both(cache_dir, queue, info):
    procs = [subprocess.Popen([sys.executable, "-c", TUNER, str(c)]) for c in (5, 7)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    entries = cache.cache_entries(info)
    for cout in (5, 7):
        assert cache.signature(problem_of(h=8, w=8, cout=cout)) in entries


# --- the tuner -----------------------------------------------------------------------------

TUNED_PROBLEMS = [
    problem_of(),
    problem_of(n=2, cin=6, h=11, w=13, cout=9, k=3, stride=2, padding=2, dilation=2,
               groups=3, padding_mode="reflect", bias=True),
    problem_of(cin=4, h=7, w=17, cout=4, k=5, padding=2, groups=4, padding_mode="circular"),
    problem_of(cin=3, cout=5, k=1, padding=0, padding_mode="replicate", bias=True,
               dtype=np.float16),
    problem_of(cin=3, cout=5, k=3, padding_mode="replicate", dtype=np.float64),
]


@pytest.mark.parametrize("p", TUNED_PROBLEMS, ids=lambda p: cache.signature(p))
def test_every_tuned_result_equals_the_reference(cache_dir, queue, info, rng, has_fp64, p):
    if p.dtype == "float64" and not has_fp64:
        pytest.skip("no cl_khr_fp64")
    # A budget that holds a few cold builds (PoCL 3.1's LLVM, built with assertions, takes
    # over 2 s for one on a fresh machine): the test needs the default and others.
    result = clconv.tune(p, budget=6.0, queue=queue)
    assert result.best is not None and result.best.ok and result.default is result.trials[0]
    assert len(result.trials) >= 2 and result.space > len(result.trials) / 2
    assert all(t.ms > 0 for t in result.trials if t.ok)
    finalists = [t for t in result.trials if t.detail.startswith("final rounds")]
    assert result.best in finalists and result.default in finalists
    assert result.best.ms == min(t.ms for t in finalists)
    assert cache.cache_entries(info)[cache.signature(p)]["config"] == result.best.config
    assert planner.chosen(p, queue) == (result.best.algorithm, result.best.config)
    run_and_check(p, queue, rng)
    assert result.report().count("\n") == len(result.trials)


class WrongWhenTk2(Direct):
    """Drops all but one input channel when tk == 2: much faster, and wrong. A space of two
    candidates (tk 1 or 2, the rest fixed), tried in full within any budget: a sampled one
    could miss tk=2 on a loaded machine."""
    name = "wrong-when-tk2"
    params = ((Param("tk", (1, 2), ""), Param("tw", (4,), ""))
              + tuple(Param(p.name, p.values[:1], "") for p in Direct.params[2:]))

    def constants(self, problem, config):
        c = super().constants(problem, config)
        return dict(c, cin_g=1) if config["tk"] == 2 else c


def test_a_fast_wrong_candidate_never_wins(cache_dir, queue):
    p = problem_of(cin=32, h=16, w=16, cout=8)
    tuner = Tuner(p, queue, candidates_from=[WrongWhenTk2()])
    wrong = tuner.evaluate(WrongWhenTk2(), {"tk": 2, "tw": 4, "lx": 1, "ly": 1, "lz": 1})
    assert wrong.status == "wrong result" and wrong.ms is None
    result = tuner.run(budget=3)
    assert result.best.ok and result.best.config["tk"] != 2
    assert any(t.status == "wrong result" for t in result.trials)


@pytest.mark.parametrize("operation", ["input_grad", "weight_grad"])
@pytest.mark.parametrize("p", [
    problem_of(n=2, cin=6, h=11, w=13, cout=4, stride=2, padding=1),
    problem_of(n=1, cin=4, h=9, w=10, cout=8, k=3, padding=2, dilation=2, groups=2,
               padding_mode="reflect"),
], ids=["s2", "reflect-d2-g2"])
def test_gradients_tune_and_their_winners_run(cache_dir, queue, info, rng, operation, p):
    result = clconv.tune(p, budget=2.5, queue=queue, operation=operation)
    assert result.best is not None and result.best.ok
    assert result.best.algorithm in [a.name for a in for_operation(operation)]
    signature = cache.signature(p, operation=operation)
    assert signature.startswith(operation) and result.signature == signature
    assert cache.cache_entries(info)[signature]["config"] == result.best.config
    assert cache.signature(p) not in cache.cache_entries(info)     # the forward is apart
    assert planner.chosen(p, queue, operation) == (result.best.algorithm, result.best.config)
    x = rng.standard_normal(p.input_shape).astype(np.float32)
    w = rng.standard_normal(p.weight_shape).astype(np.float32)
    dy = rng.standard_normal(p.output_shape).astype(np.float32)
    args = conv_args(p)
    if operation == "input_grad":
        got = clconv.conv2d_input_grad(p.input_shape, w, dy, queue=queue, **args)
        expected = conv2d_input_grad_ref(p.input_shape, w, dy, **args)
        bound = conv2d_input_grad_abs_bound(p.input_shape, w, dy, **args)
    else:
        got = clconv.conv2d_weight_grad(x, p.weight_shape, dy, queue=queue, **args)
        expected = conv2d_weight_grad_ref(x, p.weight_shape, dy, **args)
        bound = conv2d_weight_grad_abs_bound(x, p.weight_shape, dy, **args)
    assert np.abs(got - expected).max() <= 1e-5 * bound.max()


def test_a_fast_wrong_gradient_candidate_never_wins(cache_dir, queue):
    from clconv.algorithms.input_grad_gemm import InputGradGemm

    class WrongWhenTc2(InputGradGemm):
        """Sums one output channel only when tc == 2: faster, and wrong."""
        name = "wrong-when-tc2"

        def constants(self, problem, config):
            c = super().constants(problem, config)
            return dict(c, cout_g=1) if config["tc"] == 2 else c

    p = problem_of(cin=4, h=16, w=16, cout=32)
    tuner = Tuner(p, queue, candidates_from=[WrongWhenTc2()], operation="input_grad")
    wrong = tuner.evaluate(WrongWhenTc2(), {"tc": 2, "tv": 1, "tw": 4, "lx": 1, "ly": 1, "ukw": 0})
    assert wrong.status == "wrong result" and wrong.ms is None
    result = tuner.run(budget=3)
    assert result.best.ok and result.best.config["tc"] != 2


def test_unknown_operation_is_rejected(cache_dir, queue):
    with pytest.raises(ValueError, match="operation must be one of"):
        clconv.tune(problem_of(), budget=1, queue=queue, operation="backward")


class BrokenSometimes(Direct):
    """tw == 2 does not compile; lx == too_big exceeds the device's work-group limit."""
    name = "broken-sometimes"

    def __init__(self, too_big):
        Param = Direct.params[0].__class__
        self.params = (Param("tk", (1, 2), ""), Param("tw", (1, 2), ""),
                       Param("lx", (1, too_big), ""), Param("ly", (1,), ""),
                       Param("lz", (1,), ""))

    def constraints(self, problem, info, config):
        return None              # let everything through, as a careless declaration would

    def build(self, problem, queue, config, strict=True):
        if config["tw"] == 2:
            programs.program(queue.context, "__kernel void broken( { }")
        return super().build(problem, queue, config, strict)


def test_candidates_that_fail_to_build_or_launch_are_skipped(cache_dir, queue, info):
    p = problem_of()
    big = 2 * info.max_work_group_size
    result = Tuner(p, queue, candidates_from=[BrokenSometimes(big)]).run(budget=30)
    assert result.strategy == "exhaustive" and result.space == 8
    failed = [t for t in result.trials if t.status == "build failed"]
    assert {(t.config["tw"], t.config["lx"]) for t in failed} == {(2, 1), (2, big), (1, big)}
    assert any("build" in t.detail.lower() for t in failed if t.config["tw"] == 2)
    assert sum(t.ok for t in result.trials) == 1 + 2       # the default and tw=1, lx=1
    assert result.best.ok and (result.best.algorithm == result.default.algorithm
                               or result.best.config["tw"] == 1)


def test_budget_is_respected(cache_dir, queue):
    p = problem_of(cin=8, h=20, w=20, cout=16)
    result = clconv.tune(p, budget=1.5, queue=queue)
    assert result.seconds < 1.5 + 3          # one candidate may overrun, not many
    assert result.strategy == "sampled + local refinement"


# --- modes and the API ---------------------------------------------------------------------

def test_modes(cache_dir, queue, info, rng, monkeypatch):
    p = problem_of()
    cache.record(info, {cache.signature(p): entry(OTHER)})
    _, default = clconv.algorithms.choose(p, info)
    monkeypatch.setenv("CLCONV_TUNE", "off")
    assert planner.chosen(p, queue)[1] == default
    monkeypatch.setenv("CLCONV_TUNE", "cached")
    assert planner.chosen(p, queue)[1] == OTHER
    clconv.set_tune_mode("off")                  # the API overrides the variable
    assert planner.chosen(p, queue)[1] == default
    clconv.set_tune_mode(None)
    monkeypatch.setenv("CLCONV_TUNE", "bogus")
    with pytest.raises(ValueError, match="CLCONV_TUNE must be one of"):
        run_and_check(p, queue, rng)
    with pytest.raises(ValueError, match="tuning mode"):
        clconv.set_tune_mode("sometimes")


def test_mode_on_tunes_unseen_problems_once(cache_dir, queue, info, rng, monkeypatch):
    monkeypatch.setenv("CLCONV_TUNE", "on")
    monkeypatch.setenv("CLCONV_TUNE_BUDGET", "1.5")
    p = problem_of(cout=5)
    assert cache.signature(p) not in cache.cache_entries(info)
    run_and_check(p, queue, rng)
    tuned = cache.cache_entries(info)[cache.signature(p)]
    assert planner.chosen(p, queue)[1] == tuned["config"]

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned twice")
    monkeypatch.setattr(search, "tune_problem", no_tuning)
    planner.forget()
    run_and_check(p, queue, rng)                 # remembered across plans (and processes)
    monkeypatch.setenv("CLCONV_TUNE", "cached")
    run_and_check(problem_of(cout=7), queue, rng)   # cached mode never tunes


def test_an_entry_is_out_of_date_once_an_algorithm_it_did_not_search_applies(
        cache_dir, queue, info, rng, monkeypatch):
    """A tuned entry names its candidates' algorithms; one whose search lacked an algorithm
    that now applies (one added since) is passed over for the heuristic, at its own batch
    and at others, mode 'on' tunes it again, and the new entry replaces it even where it
    measured slower. An entry that names none (tuned before clconv recorded them) stays."""
    p = problem_of(cout=5)
    sig = cache.signature(p)
    applying = sorted(a.name for a in algorithms.for_operation("forward")
                      if a.applies(p) and a.suits(info))
    assert "direct" in applying and len(applying) > 1
    cache.record(info, {sig: dict(entry(OTHER, ms=1e-6), algorithms=["direct"])})
    heuristic = algorithms.choose(p, info, "forward")
    assert planner.chosen(p, queue) == (heuristic[0].name, heuristic[1])
    assert planner.chosen(problem_of(n=2, cout=5), queue)[1] != OTHER     # nearest batch too
    assert cache.unsearched(cache.cache_entries(info)[sig], p, info) == [
        a for a in applying if a != "direct"]
    cache.record(info, {sig: dict(entry(OTHER, ms=1e-6), algorithms=applying)})
    planner.forget()
    assert planner.chosen(p, queue)[1] == OTHER
    cache.record(info, {sig: entry(OTHER, ms=1e-6)}, replace=True)       # names none
    planner.forget()
    assert planner.chosen(p, queue)[1] == OTHER

    cache.record(info, {sig: dict(entry(OTHER, ms=1e-6), algorithms=["direct"])}, replace=True)
    monkeypatch.setenv("CLCONV_TUNE", "on")
    monkeypatch.setenv("CLCONV_TUNE_BUDGET", "1.5")
    planner.forget()
    run_and_check(p, queue, rng)
    tuned = cache.cache_entries(info)[sig]
    assert tuned["algorithms"] == applying and tuned["ms"] > 1e-6
    assert planner.chosen(p, queue)[1] == tuned["config"]


def test_tune_budget_variable_is_checked(cache_dir, monkeypatch):
    monkeypatch.setenv("CLCONV_TUNE_BUDGET", "soon")
    with pytest.raises(ValueError, match="CLCONV_TUNE_BUDGET"):
        clconv.tune(problem_of())
    for bad in (0, -1, "5", True):
        with pytest.raises(ValueError, match="budget"):
            clconv.tune(problem_of(), budget=bad)


def test_tune_a_module_and_lists(cache_dir, queue, info, rng):
    m = clconv.Conv2d(4, 6, 3, padding=1, bias=True, queue=queue)
    result = clconv.tune(m, (2, 4, 9, 10), budget=1)
    assert result.problem == m.problem_for((2, 4, 9, 10)) and result.problem.has_bias
    assert cache.signature(result.problem) in cache.cache_entries(info)
    x = rng.standard_normal((2, 4, 9, 10)).astype(np.float32)
    assert_matches(m(x), x, m.weight, m.bias, padding=1)
    results = clconv.tune([problem_of(cout=3), (m, (1, 4, 9, 10))], budget=1, queue=queue)
    assert [r.problem.out_channels for r in results] == [3, 6]
    with pytest.raises(ValueError, match="input_shape"):
        clconv.tune(m)
    with pytest.raises(TypeError, match="target"):
        clconv.tune("resnet")


# --- databases -----------------------------------------------------------------------------

def test_shipped_database_is_the_fallback(cache_dir, tmp_path, queue, info, monkeypatch):
    p, q = problem_of(), problem_of(cout=7)
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    cache.export_database(info, db_dir / "this-device.json",
                          {cache.signature(p): entry(OTHER), cache.signature(q): entry(OTHER)})
    monkeypatch.setattr(cache, "databases_dir", lambda: db_dir)
    assert planner.chosen(p, queue)[1] == OTHER
    cache.record(info, {cache.signature(p): entry(dict(OTHER, tk=1))})
    planner.forget()
    assert planner.chosen(p, queue)[1]["tk"] == 1           # the user's cache comes first
    assert planner.chosen(q, queue)[1] == OTHER

    data = json.loads((db_dir / "this-device.json").read_text())
    stale = {k: dict(e, sources="old") for k, e in data["entries"].items()}
    for field, value in (("match", {"name": "some other device"}), ("entries", stale)):
        (db_dir / "this-device.json").write_text(json.dumps(dict(data, **{field: value})))
        planner.forget()
        assert planner.chosen(q, queue)[1] != OTHER


def test_a_database_applies_only_to_the_processor_it_was_tuned_on(cache_dir, tmp_path, queue,
                                                                  info, monkeypatch):
    """One OpenCL name can cover CPUs whose best configurations differ (PoCL names a Zen 4
    and a Zen 5 EPYC alike): an exported database names a CPU device's processor model, and
    does not apply to another model, nor where the model is unknown."""
    import dataclasses
    p = problem_of()
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    path = db_dir / "this-device.json"
    cache.export_database(info, path, {cache.signature(p): entry(OTHER)})
    monkeypatch.setattr(cache, "databases_dir", lambda: db_dir)
    data = json.loads(path.read_text())
    if info.processor is None:
        assert "processor" not in data["match"]
        pytest.skip("no processor model here (a GPU, or a host that does not tell)")
    assert data["tuned_on"]["processor"] == info.processor
    assert cache.matching_databases(info) and planner.chosen(p, queue)[1] == OTHER
    assert not cache.matching_databases(dataclasses.replace(info, processor=None))
    path.write_text(json.dumps(dict(data, match=dict(data["match"],
                                                     processor="GenuineIntel family 6 model 1"))))
    planner.forget()
    assert not cache.matching_databases(info)
    assert planner.chosen(p, queue)[1] != OTHER


def test_shipped_databases_are_well_formed_and_current(info):
    for path in sorted(cache.databases_dir().glob("*.json")):
        data = json.loads(path.read_text())
        assert data["format"] == "clconv-tuning-database", path
        for sig, e in data["entries"].items():
            assert e["algorithm"] in ALGORITHMS, (path.name, sig)
            assert e["sources"] == cache.sources_of(e["algorithm"]), (
                f"{path.name}: {sig} was tuned with other {e['algorithm']} kernel sources: "
                "re-tune it (clconv tune --export)")
            assert {p.name for p in ALGORITHMS[e["algorithm"]].params} == set(e["config"])
            assert e["algorithm"] in e["algorithms"], (path.name, sig)


# --- command line --------------------------------------------------------------------------

def clconv_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "clconv", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def test_cli_tune_table_cache_export_and_info(cache_dir, tmp_path, info):
    suite = tmp_path / "tiny.json"
    suite.write_text(json.dumps({"layers": [
        dict(name="tiny_3x3", batch=1, in_channels=4, height=9, width=10, out_channels=6,
             kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1),
        dict(name="tiny_dw", batch=2, in_channels=8, height=12, width=12, out_channels=8,
             kernel_size=[3, 3], stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=8)]}))
    db = tmp_path / "export.json"
    first = clconv_cli("tune", "--suite", str(suite), "--budget", "1.5", "--export", str(db))
    assert first.returncode == 0, first.stderr
    assert "default ms" in first.stdout and "geometric-mean speed-up" in first.stdout
    assert "[2/2]" in first.stderr and "tiny_dw" in first.stderr
    assert len(cache.cache_entries(info)) == 2
    assert len(json.loads(db.read_text())["entries"]) == 2
    again = clconv_cli("tune", "--suite", str(suite), "--budget", "1.5", "--only", "dw")
    assert again.returncode == 0 and "(cached)" in again.stdout and "tiny_3x3" not in again.stdout
    shown = clconv_cli("info")
    assert "2 problems tuned for this device" in shown.stdout, shown.stdout
    assert str(cache.cache_path(info)) in shown.stdout
    backward = clconv_cli("tune", "--suite", str(suite), "--budget", "1", "--only", "dw",
                          "--backward")
    assert backward.returncode == 0, backward.stderr
    assert "tiny_dw input_grad" in backward.stdout and "tiny_dw weight_grad" in backward.stdout
    assert "[3/3]" in backward.stderr
    assert len(cache.cache_entries(info)) == 4


@pytest.mark.parametrize("command, args, message", [
    ("tune", ("--budget", "-1"), "budget must be a positive"),
    ("tune", ("--suite", "no-such-suite"), "suite must be one of"),
    ("tune", ("--suite", "/etc/hostname"), "suite file /etc/hostname is not a clconv layer"),
    ("bench", ("--suite", "/etc/hostname"), "suite file /etc/hostname is not a clconv layer"),
    ("tune", ("--only", "no-such-layer"), "--only 'no-such-layer' matches no layer"),
    ("bench", ("--only", "no-such-layer"), "--only 'no-such-layer' matches no layer"),
] + [(command, (option, value), f"argument {option}: must be a positive integer")
     for command in ("tune", "bench") for option, value in (("--batch", "0"), ("--batch", "-3"))]
  + [("bench", ("--repeats", "0"), "argument --repeats: must be a positive integer")])
def test_cli_rejects_bad_arguments(cache_dir, command, args, message):
    done = clconv_cli(command, *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("blocker", ["directory-at-file", "file-as-cache-dir", "missing-root",
                                     "symlinked-lock"])
def test_cli_tune_refuses_an_unwritable_cache_before_tuning(cache_dir, tmp_path, info, blocker,
                                                           monkeypatch):
    path = cache.cache_path(info)
    victim = tmp_path / "victim"
    if blocker == "directory-at-file":
        path.mkdir(parents=True)
    elif blocker == "file-as-cache-dir":
        (tmp_path / "plain-file").write_text("")
        monkeypatch.setenv("CLCONV_CACHE_DIR", str(tmp_path / "plain-file"))
    elif blocker == "missing-root":
        monkeypatch.setenv("CLCONV_CACHE_DIR", "/proc/no-such-dir")
    else:
        path.parent.mkdir(parents=True)
        os.symlink(victim, f"{path}.lock")
    done = clconv_cli("tune", "--only", "r50_conv1", "--budget", "30")
    assert done.returncode == 2, done.stderr
    assert "cannot write the tuning cache" in done.stderr and "Traceback" not in done.stderr
    assert "[1/1]" not in done.stderr            # refused before any tuning
    assert not victim.exists()                   # nothing written through the link


BAD_CONFIG_VALUES = [0, -1, -2, 2.5, "6", None, 3, True]


def bad_entries(p, info):
    """(id, entry) of crafted cache entries for problem p: every declared parameter of its
    heuristic algorithm set to each bad value, an unknown algorithm, an algorithm that does
    not suit, a missing parameter, non-numeric times."""
    algorithm, config = algorithms.choose(p, info, "forward")
    cases = [(f"{k}={v!r}", entry(dict(config, **{k: v}), algorithm=algorithm.name))
             for k in config for v in BAD_CONFIG_VALUES
             if v not in algorithm.param(k).values or type(v) is not int]
    cases += [("unknown-algorithm", entry(config, algorithm="nope")),
              ("missing-parameter", entry(dict(list(config.items())[1:]),
                                          algorithm=algorithm.name)),
              ("ms-text", dict(entry(config, algorithm=algorithm.name), ms="fast")),
              ("batch-text", dict(entry(config, algorithm=algorithm.name), batch="1")),
              ("algorithms-text", dict(entry(config, algorithm=algorithm.name),
                                       algorithms=algorithm.name))]
    unsuited = [a for a in algorithms.for_operation("forward")
                if a.applies(p) and not a.suits(info)]
    cases += [(f"unsuited-{a.name}", entry(a.default_config(p, info), algorithm=a.name))
              for a in unsuited]
    return [(name, dict(e, sources=cache.sources_of(e["algorithm"])
                        if e["algorithm"] in ALGORITHMS else "0123456789abcdef"))
            for name, e in cases]


def test_bad_cache_entries_fall_back_to_the_heuristic_with_a_warning(cache_dir, queue, info,
                                                                      rng):
    p = problem_of()
    sig = cache.signature(p)
    heuristic = algorithms.choose(p, info, "forward")
    cases = bad_entries(p, info)
    assert len(cases) > 20
    for name, bad in cases:
        path = cache.cache_path(info)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": cache.CACHE_FORMAT, "version": cache.VERSION,
                "device": cache.device_key(info),
                "entries": {sig: bad, "other n1": entry(OTHER)}}
        path.write_text(json.dumps(data))
        cache._warned.clear()
        cache._memo.clear()
        planner.forget()
        with pytest.warns(clconv.TuningCacheWarning, match=str(path)) as caught:
            run_and_check(p, queue, rng)
        assert any(sig in str(w.message) or "'nope'" in str(w.message) for w in caught), name
        assert planner.chosen(p, queue) == (heuristic[0].name, heuristic[1]), name
        # the file's other entries are kept, and a later write keeps them
        assert "other n1" in cache.cache_entries(info), name
        cache.record(info, {"third n1": entry(OTHER)})
        assert {"other n1", "third n1"} <= set(cache.cache_entries(info)), name


def test_tune_over_a_bad_cached_entry_tunes_again(cache_dir, tmp_path, info):
    suite = tmp_path / "one.json"
    suite.write_text(json.dumps({"layers": [dict(
        name="tiny_3x3", batch=1, in_channels=4, height=9, width=10, out_channels=6,
        kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)]}))
    p = problem_of()
    sig = cache.signature(p)
    path = cache.cache_path(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    algorithm, config = algorithms.choose(p, info, "forward")
    for bad in (entry(dict(config, **{next(iter(config)): 0}), algorithm=algorithm.name),
                entry(config, algorithm="nope"),
                entry(config, algorithm=algorithm.name, ms="fast")):
        path.write_text(json.dumps({"format": cache.CACHE_FORMAT, "version": cache.VERSION,
                                    "device": cache.device_key(info), "entries": {sig: bad}}))
        done = clconv_cli("tune", "--suite", str(suite), "--budget", "1")
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        tuned = cache.cache_entries(info)[sig]
        assert isinstance(tuned["ms"], float) and tuned["candidates_tried"] >= 1
        assert cache.entry_problem(ALGORITHMS[tuned["algorithm"]], tuned["config"], p, info,
                                   "forward") is None


def test_a_tuned_config_that_fails_to_launch_falls_back(cache_dir, queue, info, rng,
                                                        monkeypatch):
    p = problem_of()
    cache.record(info, {cache.signature(p): entry(OTHER)})
    planner.forget()
    real_build = ALGORITHMS["direct"].build

    def failing_build(problem, queue, config, **kwargs):
        launch = real_build(problem, queue, config, **kwargs)
        if config != OTHER:
            return launch

        def refuse(*args):
            raise cl.LogicError("clEnqueueNDRangeKernel failed: INVALID_WORK_GROUP_SIZE")
        return algorithms.Launch(refuse, launch.algorithm, launch.config)

    monkeypatch.setattr(ALGORITHMS["direct"], "build", failing_build)
    with pytest.warns(clconv.TuningCacheWarning, match="failed to launch"):
        run_and_check(p, queue, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # one warning, then the heuristic for good
        run_and_check(p, queue, rng)


def test_model_suites_load_as_valid_problems():
    from clconv.suites import layer_problem, load_suite, suite_names
    assert {"standard", "resnet50", "mobilenet_v2", "vgg16"} <= set(suite_names())
    counts = {name: sum(l.get("count", 1) for l in load_suite(name)) for name in
              ("resnet50", "mobilenet_v2", "vgg16")}
    assert counts == {"resnet50": 53, "mobilenet_v2": 52, "vgg16": 13}
    for name in suite_names():
        for layer in load_suite(name):
            assert layer_problem(layer, batch=2).batch == 2


# --- per-kernel cache keys -------------------------------------------------------------------

TUNE_TWO = textwrap.dedent("""
    import sys, numpy as np, clconv
    from clconv import store
    from clconv.algorithms import ALGORITHMS
    from clconv.problem import make_problem
    from clconv.search import Tuner, TuneResult
    assert clconv.__file__.startswith(sys.argv[1]), clconv.__file__   # the installed copy
    queue = clconv.queue_for()
    info = clconv.device_info(queue.device)
    depthwise = make_problem((1, 4, 9, 9), np.float32, (4, 1, 3, 3), np.float32, None, None,
                             1, 1, 1, 4, "zeros")[0]
    dense = make_problem((1, 4, 9, 9), np.float32, (6, 4, 3, 3), np.float32, None, None,
                         1, 1, 1, 1, "zeros")[0]
    if sys.argv[2] == "tune":
        for p, name in ((depthwise, "depthwise"), (dense, "direct")):
            # One measured candidate of that algorithm, with no time budget to run out.
            algorithm = ALGORITHMS[name]
            trial = Tuner(p, queue).evaluate(algorithm, algorithm.default_config(p, info))
            assert trial.ok, trial
            result = TuneResult(p, "forward", trial, trial, [trial])
            store.record(info, {result.signature: result.entry()})
    for p in (depthwise, dense):
        choice = store.tuned_choice(p, info)
        print(store.signature(p), "->", choice[0].name if choice else None)
""")


def test_editing_one_template_invalidates_only_its_algorithms_entries(cache_dir, tmp_path):
    """Tune a depthwise and a direct problem with an installed copy of clconv, edit
    depthwise's template in that copy: the direct entry is still used, the other ignored."""
    import shutil
    from pathlib import Path
    source = Path(clconv.__file__).parent
    site = tmp_path / "site"
    package = site / "clconv"
    shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(programs.kernels_dir(), package / "cl_kernels", dirs_exist_ok=True)
    shutil.rmtree(package / "tuning_databases", ignore_errors=True)
    (package / "tuning_databases").mkdir()                  # no shipped entries
    env = dict(os.environ, PYTHONPATH=str(site), CLCONV_CACHE_DIR=str(cache_dir))

    def run(phase):
        done = subprocess.run([sys.executable, "-c", TUNE_TWO, str(package), phase],
                              capture_output=True, text=True, timeout=300, env=env,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return [line.rsplit(" -> ", 1)[1] for line in done.stdout.splitlines()]

    assert run("tune") == ["depthwise", "direct"]
    template = package / "cl_kernels" / "depthwise.cl.mako"
    template.write_text(template.read_text() + "## an edit\n")
    assert run("check") == ["None", "direct"]
