"""Every forward algorithm passes the whole correctness matrix on its own (Winograd, an
opt-in, allowed here).

The planner picks one algorithm per problem, so test_conv_matrix alone would leave the
algorithms it does not pick untested on those cases. Here each algorithm is forced (its
heuristic configuration) on every matrix case it applies to, in float32 (and float64 and
float16 on their matrices), against the NumPy reference and torch.
"""
import contextlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clconv  # noqa: E402
from clconv import algorithms, planner  # noqa: E402
from clconv.problem import make_problem  # noqa: E402

from test_conv_matrix import ALL, F16, F64, run_and_check  # noqa: E402

FORWARD = [a.name for a in algorithms.for_operation("forward")]


def problem_of(c, dtype):
    """The clconv problem of a matrix case (for applies())."""
    bias = (c.cout,) if c.bias else None
    x_shape = c.x_shape() if c.n is not None else (1,) + c.x_shape()
    return make_problem(x_shape, dtype, c.w_shape(), dtype, bias, dtype if bias else None,
                        c.stride, c.padding, c.dilation, c.groups, c.mode)[0]


@pytest.fixture
def forced(monkeypatch):
    """force(name): every plan from here on uses that algorithm's heuristic config."""
    with contextlib.ExitStack() as stack:
        monkeypatch.setenv("CLCONV_TUNE", "off")
        stack.enter_context(clconv.winograd_allowed())   # opt-in numerics: one among the rest
        yield lambda name: stack.enter_context(clconv.use_algorithm(name))


def cases(ids, dtype):
    with clconv.winograd_allowed():
        return [pytest.param(name, case_id, id=f"{name}-{case_id}") for name in FORWARD
                for case_id in ids
                if algorithms.ALGORITHMS[name].applies(problem_of(ALL[case_id], dtype))]


@pytest.mark.parametrize("name,case_id", cases(list(ALL), "float32"))
def test_float32(forced, name, case_id):
    forced(name)
    run_and_check(ALL[case_id], "float32")
    assert planner.chosen(problem_of(ALL[case_id], "float32"), clconv.queue_for())[0] == name


@pytest.mark.parametrize("name,case_id", cases(F64, "float64"))
def test_float64(forced, name, case_id):
    forced(name)
    run_and_check(ALL[case_id], "float64")


@pytest.mark.parametrize("name,case_id", cases(F16, "float16"))
def test_float16(forced, name, case_id):
    forced(name)
    run_and_check(ALL[case_id], "float16")


def packed_cases(ids, dtype):
    """The matrix cases the implicit GEMM's packed input (pack=1) applies to."""
    from clconv.algorithms.implicit_gemm import packable
    return [pytest.param(case_id, id=case_id) for case_id in ids
            if packable(problem_of(ALL[case_id], dtype))]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_implicit_gemm_with_packed_input(monkeypatch, dtype):
    # pack=1 on every 1x1 unpadded case (strides, groups, batches, unbatched), beside the
    # heuristic's choice, which packs only from 256 output channels (and short tiles)
    monkeypatch.setenv("CLCONV_TUNE", "off")
    ids = {"float32": list(ALL), "float64": F64, "float16": F16}[dtype]
    chosen = packed_cases(ids, dtype)
    assert chosen, "no matrix case takes pack=1"
    with clconv.use_algorithm("implicit_gemm", pack=1):
        for param in chosen:
            run_and_check(ALL[param.values[0]], dtype)


def test_every_forward_algorithm_is_exercised():
    for name in FORWARD:
        assert any(p.id.startswith(name + "-") for p in cases(list(ALL), "float32")), name


def test_heuristic_falls_back_when_the_staged_input_does_not_fit():
    import dataclasses
    info = clconv.device_info(clconv.queue_for().device)
    p = problem_of(ALL["k3_p1_ch13to17"], "float32")
    assert algorithms.choose(p, info)[0].name == "implicit_gemm"
    tiny = dataclasses.replace(info, max_mem_alloc_size=64)
    gemm = algorithms.ALGORITHMS["implicit_gemm"]
    reason = gemm.constraints(p, tiny, gemm.default_config(p, tiny))
    assert "largest allocation" in reason
    assert algorithms.choose(p, tiny)[0].name == "direct"


def test_tiled_gemm_is_chosen_only_where_local_memory_is_real():
    import dataclasses

    from clconv.search import Tuner
    queue = clconv.queue_for()
    info = clconv.device_info(queue.device)
    p = problem_of(ALL["k3_p1_ch13to17"], "float32")
    tiled = algorithms.ALGORITHMS["tiled_gemm"]
    emulated = dataclasses.replace(info, local_memory=False)
    real = dataclasses.replace(info, is_cpu=False, local_memory=True, local_mem_size=32768,
                               max_work_group_size=256, max_work_item_sizes=(256, 256, 64))
    assert algorithms.choose(p, emulated)[0].name != "tiled_gemm"
    algorithm, config = algorithms.choose(p, real)
    assert algorithm is tiled and tiled.constraints(p, real, config) is None
    # A GPU with 16 KB of local memory and 128 work-items per group gets a default it runs.
    small = dataclasses.replace(real, local_mem_size=16384, max_work_group_size=128,
                                max_work_item_sizes=(128, 128, 64))
    assert tiled.constraints(p, small, tiled.default_config(p, small)) is None
    if not info.local_memory:
        assert tiled not in Tuner(p, queue).algorithms


def test_tiled_gemm_constraints_name_the_rule():
    import dataclasses
    info = clconv.device_info(clconv.queue_for().device)
    p = problem_of(ALL["k3_p1_ch13to17"], "float32")
    tiled = algorithms.ALGORITHMS["tiled_gemm"]
    good = tiled.default_config(p, info)
    assert tiled.constraints(p, info, good | {"mwg": 16, "mdim": 32}) == (
        "mwg must be a multiple of mdim and nwg of ndim")
    assert "outputs per work-item" in tiled.constraints(
        p, info, good | {"mwg": 128, "nwg": 128, "mdim": 4, "ndim": 4})
    assert "input channels per group" in tiled.constraints(p, info, good | {"cib": 32})
    huge = good | {"mwg": 128, "nwg": 128, "mdim": 16, "ndim": 16, "cib": 8}
    small = dataclasses.replace(info, local_mem_size=32768)
    assert "exceed the device's 32768 bytes of local memory" in tiled.constraints(p, small, huge)


# --- forcing an algorithm (clconv.use_algorithm) ---------------------------------------------

def test_use_algorithm_forces_the_algorithm_and_its_parameters(monkeypatch):
    import numpy as np
    from reference import assert_matches
    monkeypatch.setenv("CLCONV_TUNE", "off")
    queue = clconv.queue_for()
    p = problem_of(ALL["k3_p1_ch13to17"], "float32")
    default = planner.chosen(p, queue)
    with clconv.use_algorithm("direct", tk=3, tw=2):
        assert planner.chosen(p, queue) == (
            "direct", dict(algorithms.ALGORITHMS["direct"].default_config(
                p, clconv.device_info(queue.device)), tk=3, tw=2))
        with clconv.use_algorithm("implicit_gemm"):           # the inner block wins
            assert planner.chosen(p, queue)[0] == "implicit_gemm"
        assert planner.chosen(p, queue)[0] == "direct"
        assert planner.chosen(p, queue, "input_grad")[0] == "input_grad_gemm"    # another op
        rng = np.random.default_rng(0)
        x = rng.standard_normal(p.input_shape).astype(np.float32)
        w = rng.standard_normal(p.weight_shape).astype(np.float32)
        assert_matches(clconv.conv2d(x, w, padding=1), x, w, None, padding=1)
    assert planner.chosen(p, queue) == default


@pytest.mark.parametrize("name, params, message", [
    ("fastest", {}, "name must be one of"),
    ("direct", {"tq": 2}, "direct has no parameter 'tq'"),
    ("direct", {"tk": 99}, "direct's tk must be one of"),
    ("direct", {"tk": 2.0}, "direct's tk must be one of"),
])
def test_use_algorithm_rejects_unknown_names_parameters_and_values(name, params, message):
    with pytest.raises(ValueError, match=message):
        with clconv.use_algorithm(name, **params):
            pass


def test_use_algorithm_rejects_what_a_problem_cannot_run():
    import numpy as np
    x = np.zeros((1, 4, 6, 6), np.float32)
    with clconv.use_algorithm("depthwise"):
        with pytest.raises(ValueError, match="depthwise does not apply"):
            clconv.conv2d(x, np.zeros((4, 4, 3, 3), np.float32))
    with clconv.use_algorithm("direct", tk=16):
        with pytest.raises(ValueError, match="use_algorithm: direct config .* tk must be"):
            clconv.conv2d(x, np.zeros((4, 4, 3, 3), np.float32))


def test_a_dropped_context_frees_its_programs_and_plans():
    import gc

    import numpy as np
    import pyopencl as cl

    from clconv import programs
    device = clconv.queue_for().device
    context = cl.Context([device])
    queue = cl.CommandQueue(context)
    x = np.ones((1, 2, 5, 5), np.float32)
    clconv.conv2d(x, np.ones((3, 2, 3, 3), np.float32), queue=queue)
    tables = (programs._programs, planner._plans, planner._launches)
    assert all(context in t._tables for t in tables)
    before = [len(t._tables) for t in tables]
    del context, queue
    gc.collect()
    assert [len(t._tables) for t in tables] == [n - 1 for n in before]


# --- a GPU's limits ----------------------------------------------------------------------------

@pytest.mark.parametrize("work_items, local_bytes", [(256, 32 * 1024), (256, 64 * 1024),
                                                     (1024, 48 * 1024)])
def test_every_heuristic_fits_gpu_like_limits(queue, work_items, local_bytes):
    """On every layer of the model suites, each operation's heuristic (the tiled GEMM's
    local memory included: a GPU has real local memory) is valid under a GPU's work-group
    and local-memory limits: its constraints accept it and its work-group fits."""
    import dataclasses
    from clconv.algorithms.base import work_group_problem
    from clconv.suites import layer_problem, load_suite, suite_names
    gpu = dataclasses.replace(clconv.device_info(queue.device), is_cpu=False,
                              local_memory=True, max_work_group_size=work_items,
                              max_work_item_sizes=(work_items,) * 3,
                              local_mem_size=local_bytes)
    chosen = set()
    for suite in suite_names():
        for layer in load_suite(suite):
            problem = layer_problem(layer)
            for operation in algorithms.OPERATIONS:
                algorithm, config = algorithms.choose(problem, gpu, operation)
                where = (suite, layer["name"], operation, algorithm.name, config)
                assert algorithm.constraints(problem, gpu, config) is None, where
                try:
                    local = algorithm.ranges(problem, config)[1]
                except NotImplementedError:     # launchers of their own: lx, ly, lz
                    local = tuple(config.get(name, 1) for name in ("lx", "ly", "lz"))
                assert local is None or work_group_problem(local, gpu) is None, where
                chosen.add(algorithm.name)
    assert "tiled_gemm" in chosen        # the local-memory algorithm took part
