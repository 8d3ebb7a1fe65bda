"""clconv.conv2d_input_grad / conv2d_weight_grad / conv2d_bias_grad and the fused epilogue
of clconv.conv2d (activation=, residual=).

Every gradient is compared with the independent NumPy oracle (tests/reference.py:
conv2d_*_grad_ref, written from first principles and itself validated against torch in
tests/test_reference.py) within the forward's rigorous error model (the same sum-of-products
bound), and, for float32/float64, with torch autograd through torch.nn.Conv2d(padding_mode=...)
(torch.nn.grad.conv2d_input / conv2d_weight for zero padding) within twice that bound.
Cases are dense (each mixes several features) to keep the number of distinct OpenCL kernels,
each compiled once, small.
"""

import dataclasses
import os
import sys

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clconv  # noqa: E402
import clconv.arrays  # noqa: E402
from clconv import algorithms  # noqa: E402
from clconv.problem import make_problem  # noqa: E402

from reference import (  # noqa: E402
    ACTIVATIONS,
    assert_within,
    conv2d_bias_grad_abs_bound,
    conv2d_bias_grad_ref,
    conv2d_fused_reference,
    conv2d_input_grad_abs_bound,
    conv2d_input_grad_ref,
    conv2d_weight_grad_abs_bound,
    conv2d_weight_grad_ref,
    fused_tolerance,
    input_grad_reduction_length,
    tolerance,
    weight_grad_reduction_length,
)
from _cases import Conv, make_data, rng_for, torch_conv2d  # noqa: E402

try:  # torch is an optional second oracle here
    import torch

    HAVE_TORCH = True
except ImportError:  # pragma: no cover
    HAVE_TORCH = False


C = Conv
Z, RF, RP, CI = "zeros", "reflect", "replicate", "circular"


def _need_fp64(dtype, has_fp64):
    if np.dtype(dtype) == np.float64 and not has_fp64:
        pytest.skip("device has no fp64 support")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def grad_data(c, dtype, salt=0):
    """(x, w, b, grad_output) for case c in dtype (b is None without bias)."""
    rng = rng_for(c.label(), 100 + salt)
    x, w, b = make_data(c, dtype, rng)
    g = rng.standard_normal(c.out_shape()).astype(dtype)
    return x, w, b, g


def expected_input_grad(c, dtype, x, w, g):
    """(reference, tolerance) of the input gradient."""
    kw = c.kwargs()
    xs = tuple(x.shape)
    n_in = input_grad_reduction_length(xs, w.shape, **kw)
    return (conv2d_input_grad_ref(xs, w, g, **kw),
            tolerance(dtype, n_in, conv2d_input_grad_abs_bound(xs, w, g, **kw)))


def expected_grads(c, dtype, x, w, g):
    """{name: (reference, tolerance)} for the input, weight and bias gradients."""
    kw = c.kwargs()
    n_w = weight_grad_reduction_length(g.shape)
    return {
        "input": expected_input_grad(c, dtype, x, w, g),
        "weight": (conv2d_weight_grad_ref(x, w.shape, g, **kw),
                   tolerance(dtype, n_w, conv2d_weight_grad_abs_bound(x, w.shape, g, **kw))),
        "bias": (conv2d_bias_grad_ref(g), tolerance(dtype, n_w, conv2d_bias_grad_abs_bound(g))),
    }


def torch_grads(c, x, w, b, g):
    """{name: gradient} by torch autograd through nn.Conv2d(padding_mode=c.mode)."""
    dt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[x.dtype]
    m = torch.nn.Conv2d(c.cin, c.cout, (c.kh, c.kw), stride=c.stride, padding=c.padding,
                        dilation=c.dilation, groups=c.groups, bias=True,
                        padding_mode=c.mode, dtype=dt)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        m.bias.zero_()
    xt = torch.from_numpy(np.array(x)).requires_grad_(True)
    m(xt).backward(torch.from_numpy(np.array(g)))
    out = {"input": xt.grad.numpy(), "weight": m.weight.grad.numpy(),
           "bias": m.bias.grad.numpy()}
    if c.mode == Z and not isinstance(c.padding, str) and c.n is not None:
        args = (c.stride, c.padding, c.dilation, c.groups)
        tw, tg = torch.from_numpy(np.array(w)), torch.from_numpy(np.array(g))
        out["input (torch.nn.grad)"] = torch.nn.grad.conv2d_input(x.shape, tw, tg, *args).numpy()
        out["weight (torch.nn.grad)"] = torch.nn.grad.conv2d_weight(
            torch.from_numpy(np.array(x)), w.shape, tg, *args).numpy()
    return out


def compute_grads(c, x, w, b, g, positional=False):
    kw = c.kwargs()
    if positional:
        args = (c.stride, c.padding, c.dilation, c.groups, c.mode)
        got = {"input": clconv.conv2d_input_grad(x.shape, w, g, *args),
               "weight": clconv.conv2d_weight_grad(x, w.shape, g, *args)}
    else:
        got = {"input": clconv.conv2d_input_grad(x.shape, w, g, **kw),
               "weight": clconv.conv2d_weight_grad(x, w.shape, g, **kw)}
    if b is not None:
        got["bias"] = clconv.conv2d_bias_grad(g)
    return got


def check_grads(c, dtype, x, w, b, g, *, label, positional=False, with_torch=True):
    dtype = np.dtype(dtype)
    copies = [np.array(a) for a in (x, w, g)]
    got = compute_grads(c, x, w, b, g, positional)
    for name, a, a0 in zip(("input", "weight", "grad_output"), (x, w, g), copies):
        np.testing.assert_array_equal(a, a0, err_msg=f"{label}: {name} modified")
    exp = expected_grads(c, dtype, x, w, g)
    for name, y in got.items():
        ref, tol = exp[name]
        assert_within(y, ref, tol, dtype=dtype, label=f"{label} {name} grad vs reference")
    if with_torch and HAVE_TORCH and dtype in (np.float32, np.float64):
        # |y - torch| <= |y - exact| + |torch - exact|: twice the bound.
        for name, t in torch_grads(c, x, w, b, g).items():
            key = name.split(" ")[0]
            if key in got:
                assert_within(got[key], t, 2.0 * exp[key][1], dtype=dtype,
                              label=f"{label} {name} grad vs torch")
    return got


def run_case(c, dtype, label, salt=0, **kw):
    x, w, b, g = grad_data(c, dtype, salt)
    return check_grads(c, dtype, x, w, b, g, label=f"{label} {np.dtype(dtype).name}", **kw)


# ---------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------

# (id, Conv) -- Conv(n, cin, h, w, cout, k, stride, padding, dilation, groups, bias, mode)
MATRIX = [
    # kernel size / stride
    ("k1_pointwise", C(2, 3, 5, 6, 4, 1)),
    ("k1_s2_odd_rows_unread", C(2, 3, 6, 7, 5, 1, 2, 0, 1, 1, False)),
    ("k1_s2x3_p1_g2", C(2, 4, 8, 10, 6, 1, (2, 3), 1, 1, 2, False)),
    ("k3_s2_p1", C(2, 3, 9, 8, 4, 3, 2, 1, 1, 1, False)),
    ("k3_s3_last_unread", C(2, 3, 10, 11, 4, 3, 3, 0)),
    ("k2_s3_gaps", C(1, 2, 8, 9, 3, 2, 3, 0)),
    ("k5_s2_overlap", C(2, 2, 11, 10, 3, 5, 2, 2)),
    ("k7_s2_p3_stem", C(1, 3, 15, 14, 8, 7, 2, 3)),
    ("s2x3_pair_p1x0", C(2, 3, 9, 11, 4, (3, 2), (2, 3), (1, 0))),
    ("s3x1_d2x1", C(1, 3, 13, 8, 4, 3, (3, 1), (2, 1), (2, 1))),
    # padding forms
    ("pad_pair_k3x5", C(2, 3, 6, 7, 5, (3, 5), 1, (2, 1))),
    ("pad_larger_than_input", C(1, 2, 4, 5, 3, 3, 2, 5)),
    ("valid_s2x3_d1x2", C(2, 3, 8, 7, 4, (3, 4), (2, 3), "valid", (1, 2))),
    ("same_k3", C(2, 3, 7, 6, 4, 3, 1, "same")),
    ("same_k2_even_asym", C(2, 3, 7, 6, 4, 2, 1, "same")),
    ("same_k4x3_d3x1_asym", C(1, 3, 9, 8, 4, (4, 3), 1, "same", (3, 1))),
    # dilation
    ("d3x2_s2", C(1, 2, 11, 12, 3, 3, 2, 1, (3, 2))),
    # groups
    ("g3_s2_k3x2", C(2, 6, 8, 7, 9, (3, 2), 2, 1, 1, 3, False)),
    ("depthwise_mult2_s2", C(2, 3, 7, 7, 6, 3, 2, 1, 1, 3)),
    ("depthwise_mult3_same_d2", C(1, 4, 8, 7, 12, 3, 1, "same", 2, 4)),
    ("depthwise_same_k2x3_d2_asym", C(2, 4, 8, 7, 4, (2, 3), 1, "same", 2, 4)),
    ("depthwise_p1_unbatched", C(None, 5, 6, 9, 5, 3, 1, 1, 1, 5)),
    # padding modes
    ("reflect_pad_size_minus1_s2", C(2, 2, 4, 5, 3, 3, 2, (3, 4), 1, 1, True, RF)),
    ("reflect_same_k4_g2", C(2, 4, 6, 7, 4, 4, 1, "same", 1, 2, True, RF)),
    ("replicate_p2_s2", C(2, 3, 9, 8, 4, 3, 2, 2, 1, 1, True, RP)),
    ("replicate_pad_exceeds_input", C(1, 2, 3, 4, 3, 3, 1, (6, 4), 1, 1, True, RP)),
    ("replicate_depthwise_d2", C(2, 4, 7, 8, 4, 3, 1, (2, 3), 2, 4, False, RP)),
    ("circular_pad_eq_size", C(2, 2, 4, 3, 3, 3, 1, (4, 3), 1, 1, True, CI)),
    ("circular_same_k2x5_d1x2_g3", C(1, 3, 7, 6, 6, (2, 5), 1, "same", (1, 2), 3, True, CI)),
    ("circular_s3_last_unread", C(2, 2, 10, 9, 3, 3, 3, 1, 1, 1, True, CI)),
    # batch / unbatched / degenerate
    ("unbatched", C(None, 3, 7, 6, 4, 3, 1, 1)),
    ("unbatched_reflect_g2_s2x1", C(None, 4, 9, 7, 6, (3, 2), (2, 1), 1, 1, 2, True, RF)),
    ("unbatched_circular_depthwise_same", C(None, 5, 6, 6, 5, 4, 1, "same", 1, 5, False, CI)),
    ("batch0", C(0, 3, 7, 6, 4, 3, 1, 1)),
    ("batch0_reflect_s2", C(0, 3, 6, 5, 4, 3, 2, 1, 1, 1, True, RF)),
    ("in1x1_k3_p1", C(2, 3, 1, 1, 4, 3, 1, 1)),
    ("exact_cover_k5", C(2, 3, 5, 5, 4, 5)),
    # beyond one work-group tile
    ("channels_33to17_replicate", C(1, 33, 9, 10, 17, 3, 1, 1, 1, 1, True, RP)),
    ("wide_13x37", C(1, 3, 13, 37, 5, 3, 1, 1)),
]
CASES = dict(MATRIX)
assert len(CASES) == len(MATRIX), "duplicate case ids"

# Every case runs in at least one dtype; each (case, dtype) compiles its own kernels (~1 s
# with PoCL), so float32 leaves out cases whose features other float32 cases repeat and that
# float64 / float16 run in full.
F64 = ["k3_s3_last_unread", "k5_s2_overlap", "s2x3_pair_p1x0", "same_k4x3_d3x1_asym",
       "depthwise_mult3_same_d2", "depthwise_same_k2x3_d2_asym", "reflect_pad_size_minus1_s2",
       "replicate_pad_exceeds_input", "circular_same_k2x5_d1x2_g3",
       "unbatched_reflect_g2_s2x1", "batch0_reflect_s2", "k1_s2x3_p1_g2"]
F16 = ["k3_s2_p1", "same_k2_even_asym", "depthwise_same_k2x3_d2_asym", "reflect_same_k4_g2",
       "replicate_pad_exceeds_input", "circular_s3_last_unread", "unbatched", "k1_s2x3_p1_g2"]
F32_ONLY_ELSEWHERE = {"k5_s2_overlap", "s2x3_pair_p1x0", "same_k4x3_d3x1_asym",
                      "depthwise_mult3_same_d2", "circular_same_k2x5_d1x2_g3",
                      "unbatched_reflect_g2_s2x1", "batch0_reflect_s2", "k3_s2_p1"}
F32 = [k for k in CASES if k not in F32_ONLY_ELSEWHERE]
assert set(CASES) == set(F32) | set(F64) | set(F16)


@pytest.mark.parametrize("case_id", F32)
def test_float32(case_id):
    run_case(CASES[case_id], np.float32, case_id)



@pytest.mark.parametrize("case_id", F64)
def test_float64(case_id, has_fp64):
    _need_fp64(np.float64, has_fp64)
    run_case(CASES[case_id], np.float64, case_id)


@pytest.mark.parametrize("case_id", F16)
def test_float16(case_id):
    run_case(CASES[case_id], np.float16, case_id)


# Each case above runs the algorithm the heuristic picks for it; here every other gradient
# algorithm that applies to the case is forced on it (its heuristic configuration).
GRADIENT_ALGORITHMS = [a.name for op in ("input_grad", "weight_grad")
                       for a in algorithms.for_operation(op)]


def problem_of(c, dtype):
    x_shape = c.x_shape() if c.n is not None else (1,) + c.x_shape()
    return make_problem(x_shape, dtype, c.w_shape(), dtype, None, None, c.stride, c.padding,
                        c.dilation, c.groups, c.mode)[0]


def forced_cases(ids, dtype):
    info = clconv.device_info(clconv.queue_for().device)

    def not_the_heuristics(name, problem):
        algorithm = algorithms.ALGORITHMS[name]
        return (algorithm.applies(problem)
                and algorithms.choose(problem, info, algorithm.operation)[0] is not algorithm)
    return [pytest.param(name, case_id, id=f"{name}-{case_id}") for name in GRADIENT_ALGORITHMS
            for case_id in ids if not_the_heuristics(name, problem_of(CASES[case_id], dtype))]


@pytest.mark.parametrize("name,case_id", forced_cases(F32, "float32"))
def test_every_algorithm_float32(name, case_id):
    with clconv.use_algorithm(name):
        run_case(CASES[case_id], np.float32, f"{name} {case_id}")


@pytest.mark.parametrize("name,case_id", forced_cases(F64, "float64"))
def test_every_algorithm_float64(name, case_id, has_fp64):
    _need_fp64(np.float64, has_fp64)
    with clconv.use_algorithm(name):
        run_case(CASES[case_id], np.float64, f"{name} {case_id}")


@pytest.mark.parametrize("name,case_id", forced_cases(F16, "float16"))
def test_every_algorithm_float16(name, case_id):
    with clconv.use_algorithm(name):
        run_case(CASES[case_id], np.float16, f"{name} {case_id}")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_input_grad_gemm_with_the_weight_transposed(dtype, has_fp64):
    # wt=1 on every case with several channels a side per group (strides, dilations,
    # groups, padding modes, unbatched), beside the heuristic's choice, which transposes
    # only large weights read many times.
    from clconv.algorithms.input_grad_gemm import transposable
    _need_fp64(np.dtype(dtype), has_fp64)
    ids = {"float32": F32, "float64": F64, "float16": F16}[dtype]
    chosen = [case_id for case_id in ids if transposable(problem_of(CASES[case_id], dtype))]
    assert chosen, "no matrix case takes wt=1"
    with clconv.use_algorithm("input_grad_gemm", wt=1):
        for case_id in chosen:
            c = CASES[case_id]
            x, w, _, g = grad_data(c, np.dtype(dtype).type)
            got = clconv.conv2d_input_grad(x.shape, w, g, **c.kwargs())
            assert_within(got, *expected_input_grad(c, np.dtype(dtype), x, w, g),
                          dtype=np.dtype(dtype), label=f"wt=1 {case_id} {dtype}")


def test_every_gradient_algorithm_is_exercised():
    """Every gradient algorithm runs on the matrix: by the heuristic's choice or forced."""
    info = clconv.device_info(clconv.queue_for().device)
    chosen, forced = set(), set()
    for ids, dtype in ((F32, "float32"), (F64, "float64"), (F16, "float16")):
        forced |= {p.values[0] for p in forced_cases(ids, dtype)}
        chosen |= {algorithms.choose(problem_of(CASES[case_id], dtype), info, op)[0].name
                   for case_id in ids for op in ("input_grad", "weight_grad")}
    assert chosen | forced == set(GRADIENT_ALGORITHMS)


def test_positional_arguments():
    run_case(CASES["d3x2_s2"], np.float32, "positional", salt=1, positional=True)


def test_default_arguments():
    c = C(2, 3, 6, 5, 4, 3)
    x, w, b, g = grad_data(c, np.float32)
    exp = expected_grads(c, np.float32, x, w, g)
    for name, got in (("input", clconv.conv2d_input_grad(x.shape, w, g)),
                      ("weight", clconv.conv2d_weight_grad(x, w.shape, g))):
        assert_within(got, *exp[name], dtype=np.float32, label=f"defaults {name}")


def test_shapes_as_lists_and_numpy_ints():
    c = CASES["g3_s2_k3x2"]
    x, w, _, g = grad_data(c, np.float32, salt=2)
    exp = expected_grads(c, np.float32, x, w, g)
    for shape in (list(x.shape), tuple(np.int64(v) for v in x.shape)):
        assert_within(clconv.conv2d_input_grad(shape, w, g, **c.kwargs()), *exp["input"],
                      dtype=np.float32, label=f"input_shape={shape!r}")
    for shape in (list(w.shape), tuple(np.int64(v) for v in w.shape)):
        assert_within(clconv.conv2d_weight_grad(x, shape, g, **c.kwargs()), *exp["weight"],
                      dtype=np.float32, label=f"weight_shape={shape!r}")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("plane", [(1, 1), (3, 3), (3, 4), (4, 5), (5, 5), (1, 31), (6, 6),
                                   (7, 7), (1, 33)])
def test_bias_grad_over_every_vector_split_of_the_plane(plane, dtype, has_fp64):
    """Planes shorter than a vector, of whole vectors, and of one or more vectors and a tail
    (one vector and a tail in half crashed PoCL 3.1's compiled loop), split and not."""
    if dtype == "float64" and not has_fp64:
        pytest.skip("no fp64")
    for batch in (1, 64):
        g = np.random.default_rng(batch).standard_normal((batch, 3) + plane).astype(dtype)
        db = clconv.conv2d_bias_grad(g)
        assert db.dtype == g.dtype and db.shape == (3,)
        terms = batch * plane[0] * plane[1]
        assert_within(db, conv2d_bias_grad_ref(g),
                      tolerance(dtype, terms, conv2d_bias_grad_abs_bound(g)),
                      dtype=np.dtype(dtype), label=f"{batch}x3x{plane}")


def test_batch_zero_mirrors_torch():
    """torch.nn.grad gives an empty input gradient and an all-zero weight gradient."""
    c = CASES["batch0"]
    x, w, b, g = grad_data(c, np.float32)
    dx = clconv.conv2d_input_grad(x.shape, w, g, **c.kwargs())
    dw = clconv.conv2d_weight_grad(x, w.shape, g, **c.kwargs())
    db = clconv.conv2d_bias_grad(g)
    assert isinstance(dx, np.ndarray) and dx.shape == x.shape and dx.dtype == np.float32
    assert isinstance(dw, np.ndarray) and dw.shape == w.shape and dw.dtype == np.float32
    assert isinstance(db, np.ndarray) and db.shape == (c.cout,) and db.dtype == np.float32
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)
    if HAVE_TORCH:
        tw = torch.nn.grad.conv2d_weight(torch.from_numpy(x), w.shape, torch.from_numpy(g),
                                         c.stride, c.padding)
        np.testing.assert_array_equal(dw, tw.numpy())


def test_unread_input_positions_get_exactly_zero():
    """Rows/columns no window reads (stride > kernel, or the floor in the output size)."""
    for case_id, rows, cols in (("k3_s3_last_unread", [9], [9, 10]),
                                ("k2_s3_gaps", [2, 5], [2, 5, 8]),
                                ("k1_s2_odd_rows_unread", [1, 3, 5], [1, 3, 5])):
        c = CASES[case_id]
        x, w, _, g = grad_data(c, np.float32)
        dx = clconv.conv2d_input_grad(x.shape, w, g, **c.kwargs())
        assert np.all(dx[..., rows, :] == 0), case_id
        assert np.all(dx[..., :, cols] == 0), case_id


def test_float16_weight_grad_accumulates_in_float32():
    """Positive integer data whose sums exceed half's exact-integer range (2048).

    With float32 accumulation every partial sum is exact and only the final rounding to
    half remains (<= 2^-11 relative); accumulating in half would drift by many ulps.
    """
    c = C(2, 2, 24, 24, 3, 3, 1, 1, 1, 1, True)
    rng = rng_for("f16acc-grad", 0)
    x = rng.integers(1, 5, c.x_shape()).astype(np.float16)
    w = rng.integers(1, 5, c.w_shape()).astype(np.float16)
    g = rng.integers(1, 5, c.out_shape()).astype(np.float16)
    for name, got, ref in (
            ("weight", clconv.conv2d_weight_grad(x, w.shape, g, **c.kwargs()),
             conv2d_weight_grad_ref(x, w.shape, g, **c.kwargs())),
            ("bias", clconv.conv2d_bias_grad(g), conv2d_bias_grad_ref(g))):
        assert ref.min() > 2048 and ref.max() < 65504
        assert got.dtype == np.float16
        err = np.abs(got.astype(np.float64) - ref)
        assert np.all(err <= 2.0**-11 * np.abs(ref)), (
            f"{name}: max error {err.max()} at {np.unravel_index(err.argmax(), err.shape)}")


# ---------------------------------------------------------------------------
# layouts and device arrays
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noncontiguous_host_operands(dtype, has_fp64):
    _need_fp64(dtype, has_fp64)
    c = CASES["replicate_p2_s2"]
    rng = rng_for("noncontiguous-grad", 1)
    x = rng.standard_normal((c.n, c.h, c.w, c.cin)).astype(dtype).transpose(0, 3, 1, 2)
    w = rng.standard_normal((c.kh, c.kw, c.cin, c.cout)).astype(dtype).transpose(3, 2, 0, 1)
    big = rng.standard_normal(c.out_shape()[:-1] + (2 * c.out_shape()[-1] + 1,)).astype(dtype)
    g = big[..., 1::2]
    b = np.zeros(c.cout, dtype)
    assert not (x.flags.c_contiguous or w.flags.c_contiguous or g.flags.c_contiguous)
    check_grads(c, dtype, x, w, b, g, label=f"non-contiguous {np.dtype(dtype).name}")


def test_device_arrays_in_device_arrays_out(queue):
    c = CASES["reflect_same_k4_g2"]
    x, w, _, g = grad_data(c, np.float32, salt=3)
    exp = expected_grads(c, np.float32, x, w, g)
    xd, wd, gd = (cl_array.to_device(queue, a) for a in (x, w, g))
    got = {"input": clconv.conv2d_input_grad(x.shape, wd, gd, **c.kwargs()),
           "weight": clconv.conv2d_weight_grad(xd, w.shape, gd, **c.kwargs()),
           "bias": clconv.conv2d_bias_grad(gd)}
    for name, y in got.items():
        assert isinstance(y, cl_array.Array), f"{name}: got {type(y)}"
        assert y.queue is queue, name
        assert_within(y.get(), *exp[name], dtype=np.float32, label=f"device {name}")
    np.testing.assert_array_equal(gd.get(), g)   # operands untouched


MASKS = [(True, True, True), (True, False, False), (False, True, True), (False, False, False)]


@pytest.mark.parametrize("case_id", ["reflect_same_k4_g2", "unbatched", "batch0_reflect_s2",
                                     "k3_s2_p1"])
def test_backward_is_the_three_gradients_at_once(case_id):
    c = CASES[case_id]
    x, w, _, g = grad_data(c, np.float32, salt=4)
    separate = (clconv.conv2d_input_grad(x.shape, w, g, **c.kwargs()),
                clconv.conv2d_weight_grad(x, w.shape, g, **c.kwargs()),
                clconv.conv2d_bias_grad(g))
    exp = expected_grads(c, np.float32, x, w, g)
    for mask in MASKS:
        got = clconv.conv2d_backward(x, w, g, **c.kwargs(), output_mask=mask)
        assert len(got) == 3
        for name, wanted, y, alone in zip(("input", "weight", "bias"), mask, got, separate):
            if not wanted:
                assert y is None, f"{case_id} {mask}: {name} not asked for"
                continue
            np.testing.assert_array_equal(y, alone, err_msg=f"{case_id} {mask} {name}")
            assert_within(y, *exp[name], dtype=np.float32, label=f"backward {case_id} {name}")


def test_backward_waits_once_for_every_gradient(monkeypatch):
    c = CASES["reflect_same_k4_g2"]
    x, w, _, g = grad_data(c, np.float32, salt=5)
    expected = clconv.conv2d_backward(x, w, g, **c.kwargs())
    waits, real = [], clconv.arrays.to_host

    def counted(queue, outputs):
        waits.append(len(outputs))
        return real(queue, outputs)

    monkeypatch.setattr(clconv.arrays, "to_host", counted)
    got = clconv.conv2d_backward(x, w, g, **c.kwargs())
    if clconv.arrays.shares_host_memory(clconv.queue_for()):
        assert waits == [3]       # three results written in place, one wait
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_backward_device_arrays_in_device_arrays_out(queue):
    c = CASES["k3_s2_p1"]
    x, w, _, g = grad_data(c, np.float32, salt=6)
    exp = expected_grads(c, np.float32, x, w, g)
    xd, wd, gd = (cl_array.to_device(queue, a) for a in (x, w, g))
    got = clconv.conv2d_backward(xd, wd, gd, **c.kwargs())
    for name, y in zip(("input", "weight", "bias"), got):
        assert isinstance(y, cl_array.Array) and y.queue is queue, name
        assert_within(y.get(), *exp[name], dtype=np.float32, label=f"device backward {name}")


def test_backward_failing_after_a_launch_waits_for_it(monkeypatch):
    # The input gradient's kernels write into a NumPy result that a failure of the weight
    # gradient's launch drops: the call must wait for them before it raises. A failure
    # while planning comes before any kernel is enqueued (every launch is made ready first).
    c = CASES["k3_s2_p1"]
    x, w, _, g = grad_data(c, np.float32, salt=7)
    expected = clconv.conv2d_backward(x, w, g, **c.kwargs())
    real_plan, events = clconv.planner.plan, []

    def failing(when):
        def plan(problem, queue, operation="forward", epilogue=()):
            if operation == "weight_grad" and when == "planning":
                raise RuntimeError("injected planning failure")
            launch = real_plan(problem, queue, operation, epilogue)

            def recorded(*args, **kwargs):
                if operation == "weight_grad":
                    raise RuntimeError("injected launch failure")
                events.extend(launch(*args, **kwargs))
                return events
            return recorded
        return plan

    real_finish, finished = cl.CommandQueue.finish, []

    def finish(queue):
        real_finish(queue)
        finished.append(all(e.command_execution_status == cl.command_execution_status.COMPLETE
                            for e in events))

    monkeypatch.setattr(cl.CommandQueue, "finish", finish)
    monkeypatch.setattr(clconv.planner, "plan", failing("launch"))
    with pytest.raises(RuntimeError, match="injected launch failure"):
        clconv.conv2d_backward(x, w, g, **c.kwargs())
    assert events and finished == [True]     # the input gradient's, waited for, before the raise
    events.clear(), finished.clear()
    monkeypatch.setattr(clconv.planner, "plan", failing("planning"))
    with pytest.raises(RuntimeError, match="injected planning failure"):
        clconv.conv2d_backward(x, w, g, **c.kwargs())
    assert not events and not finished       # nothing enqueued: nothing to wait for
    monkeypatch.undo()
    for a, b in zip(clconv.conv2d_backward(x, w, g, **c.kwargs()), expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mask", [(True, True), (1, 1, 1), "yes", None, (True, True, None)])
def test_backward_output_mask_must_be_three_bools(mask):
    x, w, g = _ok()
    with pytest.raises(TypeError, match="output_mask must be three bools"):
        clconv.conv2d_backward(x, w, g, groups=2, output_mask=mask)


def test_backward_checks_before_any_device_work(no_device_work):
    x, w, g = _ok()
    with pytest.raises(ValueError, match="grad_output"):
        clconv.conv2d_backward(x, w, g[:, :5], groups=2)
    with pytest.raises(ValueError, match="groups"):
        clconv.conv2d_backward(x, w, g, groups=3)
    with pytest.raises(TypeError, match="weight"):
        clconv.conv2d_backward(x, w.astype(np.float64), g, groups=2)
    with pytest.raises(TypeError, match="input"):
        clconv.conv2d_backward([1.0], w, g, groups=2)


def test_device_noncontiguous_views(queue):
    c = CASES["circular_s3_last_unread"]
    rng = rng_for("device-views", 0)
    xb = rng.standard_normal((c.n, c.cin, c.h, 2 * c.w)).astype(np.float32)
    gb = rng.standard_normal(c.out_shape()[:-2] + (c.out_shape()[-1], c.out_shape()[-2])
                             ).astype(np.float32)
    x, g = xb[..., ::2], gb.transpose(0, 1, 3, 2)
    w = rng.standard_normal(c.w_shape()).astype(np.float32)
    xd = cl_array.to_device(queue, xb)[:, :, :, ::2]
    gd = cl_array.to_device(queue, gb).transpose((0, 1, 3, 2))
    assert not xd.flags.c_contiguous and not gd.flags.c_contiguous
    exp = expected_grads(c, np.float32, x, w, g)
    got = {"input": clconv.conv2d_input_grad(x.shape, w, gd, **c.kwargs()),
           "weight": clconv.conv2d_weight_grad(xd, w.shape, gd, **c.kwargs()),
           "bias": clconv.conv2d_bias_grad(gd)}
    for name, y in got.items():
        assert isinstance(y, cl_array.Array), f"{name}: got {type(y)}"
        assert_within(y.get(), *exp[name], dtype=np.float32, label=f"device view {name}")


def test_device_unbatched_and_batch_zero(queue):
    c = CASES["unbatched"]
    x, w, _, g = grad_data(c, np.float32)
    dx = clconv.conv2d_input_grad(x.shape, cl_array.to_device(queue, w),
                                  cl_array.to_device(queue, g), **c.kwargs())
    assert isinstance(dx, cl_array.Array) and dx.shape == x.shape
    assert_within(dx.get(), *expected_grads(c, np.float32, x, w, g)["input"], dtype=np.float32,
                  label="device unbatched")
    c0 = CASES["batch0"]
    x0, w0, _, g0 = grad_data(c0, np.float32)
    dw = clconv.conv2d_weight_grad(cl_array.to_device(queue, x0), w0.shape,
                                   cl_array.to_device(queue, g0), **c0.kwargs())
    db = clconv.conv2d_bias_grad(cl_array.to_device(queue, g0))
    assert isinstance(dw, cl_array.Array) and isinstance(db, cl_array.Array)
    np.testing.assert_array_equal(dw.get(), 0)
    np.testing.assert_array_equal(db.get(), 0)


def test_explicit_queue_with_host_operands(queue):
    c = CASES["same_k3"]
    x, w, _, g = grad_data(c, np.float32)
    exp = expected_grads(c, np.float32, x, w, g)
    dx = clconv.conv2d_input_grad(x.shape, w, g, **c.kwargs(), queue=queue)
    dw = clconv.conv2d_weight_grad(x, w.shape, g, **c.kwargs(), queue=queue)
    db = clconv.conv2d_bias_grad(g, queue=queue)
    for name, y in (("input", dx), ("weight", dw), ("bias", db)):
        assert_within(y, *exp[name], dtype=np.float32, label=f"queue= {name}")


# ---------------------------------------------------------------------------
# argument validation (before any device work)
# ---------------------------------------------------------------------------

def _ok():
    x = np.ones((2, 4, 7, 7), np.float32)
    w = np.ones((6, 2, 3, 3), np.float32)   # groups=2
    g = np.ones((2, 6, 5, 5), np.float32)
    return x, w, g


@pytest.mark.parametrize("shape", [(4, 7), (7,), (1, 2, 4, 7, 7), ()])
def test_input_shape_wrong_length(shape):
    _, w, g = _ok()
    with pytest.raises(ValueError):
        clconv.conv2d_input_grad(shape, w, g, groups=2)


def test_input_shape_channels_do_not_match_weight():
    _, w, g = _ok()
    with pytest.raises(ValueError):
        clconv.conv2d_input_grad((2, 6, 7, 7), w, g, groups=2)   # needs 4 channels
    with pytest.raises(ValueError):
        clconv.conv2d_input_grad((2, 4, 7, 7), w, g, groups=1)   # weight wants 2 at groups=1
    with pytest.raises(ValueError):
        clconv.conv2d_input_grad((2, 4, 7, 7), w, g, groups=4)   # 6 out channels % 4
    with pytest.raises(ValueError):
        clconv.conv2d_input_grad((2, 4, 7, 7), np.ones((6, 2, 3), np.float32), g, groups=2)


def test_weight_shape_mismatch():
    x, _, g = _ok()
    for shape, groups in (((6, 4, 3, 3), 2), ((6, 2, 3, 3), 1), ((6, 2, 3), 2),
                          ((6, 2, 3, 3, 1), 2), ((5, 2, 3, 3), 2), ((6, 1, 3, 3), 4)):
        with pytest.raises(ValueError):
            clconv.conv2d_weight_grad(x, shape, g, groups=groups)


@pytest.mark.parametrize("gshape", [(2, 6, 5, 4), (2, 6, 4, 5), (2, 5, 5, 5), (1, 6, 5, 5),
                                    (6, 5, 5), (2, 6, 5, 5, 1)])
def test_grad_output_shape_mismatch_names_grad_output(gshape):
    x, w, _ = _ok()
    g = np.ones(gshape, np.float32)
    with pytest.raises(ValueError, match="grad_output"):
        clconv.conv2d_input_grad(x.shape, w, g, groups=2)
    with pytest.raises(ValueError, match="grad_output"):
        clconv.conv2d_weight_grad(x, w.shape, g, groups=2)


def test_grad_output_shape_follows_padding_stride_dilation():
    x, w, _ = _ok()
    # padding 1 -> 7x7 output; stride 2 -> 3x3; dilation 2 -> 3x3; 'same' -> 7x7
    for kw, good in ((dict(padding=1), (2, 6, 7, 7)), (dict(stride=2), (2, 6, 3, 3)),
                     (dict(dilation=2), (2, 6, 3, 3)), (dict(padding="same"), (2, 6, 7, 7))):
        with pytest.raises(ValueError, match="grad_output"):
            clconv.conv2d_input_grad(x.shape, w, np.ones((2, 6, 5, 5), np.float32), groups=2,
                                     **kw)
        assert clconv.conv2d_input_grad(x.shape, w, np.ones(good, np.float32), groups=2,
                                        **kw).shape == x.shape


def test_unbatched_mismatch():
    x, w, g = _ok()
    with pytest.raises(ValueError, match="grad_output"):
        clconv.conv2d_input_grad(x.shape[1:], w, g, groups=2)      # batched grad_output
    with pytest.raises(ValueError, match="grad_output"):
        clconv.conv2d_weight_grad(x[0], w.shape, g, groups=2)


def test_bias_grad_bad_rank():
    for shape in ((6,), (6, 5), (1, 2, 6, 5, 5)):
        with pytest.raises(ValueError, match="grad_output"):
            clconv.conv2d_bias_grad(np.ones(shape, np.float32))


@pytest.mark.parametrize("which", ["weight", "grad_output"])
def test_input_grad_dtype_mismatch(which):
    _, w, g = _ok()
    if which == "weight":
        w = w.astype(np.float16)
    else:
        g = g.astype(np.float16)
    with pytest.raises(TypeError):
        clconv.conv2d_input_grad((2, 4, 7, 7), w, g, groups=2)


@pytest.mark.parametrize("which", ["input", "grad_output"])
def test_weight_grad_dtype_mismatch(which):
    x, w, g = _ok()
    if which == "input":
        x = x.astype(np.float16)
    else:
        g = g.astype(np.float16)
    with pytest.raises(TypeError):
        clconv.conv2d_weight_grad(x, w.shape, g, groups=2)


def test_unsupported_dtypes():
    x, w, g = _ok()
    with pytest.raises(TypeError):
        clconv.conv2d_input_grad(x.shape, w.astype(np.int32), g.astype(np.int32), groups=2)
    with pytest.raises(TypeError):
        clconv.conv2d_weight_grad(x.astype(np.int64), w.shape, g.astype(np.int64), groups=2)
    with pytest.raises(TypeError):
        clconv.conv2d_bias_grad(g.astype(np.int32))


def test_geometry_errors():
    x, w, g = _ok()
    with pytest.raises(ValueError):
        clconv.conv2d_input_grad(x.shape, w, np.ones((2, 6, 4, 4), np.float32), groups=2,
                                 stride=2, padding="same")
    with pytest.raises(ValueError):
        clconv.conv2d_input_grad(x.shape, w, g, groups=2, padding_mode="mirror")
    with pytest.raises(ValueError):
        clconv.conv2d_weight_grad(x, w.shape, g, groups=2, padding="full")
    with pytest.raises(ValueError):      # reflect padding must be < input size
        clconv.conv2d_input_grad((2, 4, 3, 3), w, np.ones((2, 6, 7, 7), np.float32), groups=2,
                                 padding=3, padding_mode="reflect")
    with pytest.raises(ValueError):
        clconv.conv2d_weight_grad(x, w.shape, g, groups=0)
    with pytest.raises(ValueError):
        clconv.conv2d_weight_grad(x, w.shape, g, groups=2, stride=0)


# ---------------------------------------------------------------------------
# fused epilogue: conv2d(..., activation=, residual=)
# ---------------------------------------------------------------------------

EPI_CONVS = [
    C(2, 4, 7, 6, 6, 3, 1, 1, 1, 2, True, RF),
    C(2, 3, 9, 8, 5, 3, 2, 1, 1, 1, True, Z),
    C(None, 3, 6, 7, 4, 2, 1, "same", 1, 1, True, CI),
]
ACTS = (None,) + ACTIVATIONS


def _epi_cases():
    out = []
    i = 0
    # every activation with bias and residual and with neither, and each of the mixed
    # combinations for two activations; None (plain forward) only with a residual
    mixed = {None: ((True, True), (False, True)), "relu": ((True, False),),
             "relu6": ((False, True),), "silu": ((False, True),), "gelu": ((True, False),)}
    for act in ACTS:
        combos = mixed[act] if act is None else ((True, True), (False, False)) + mixed[act]
        for bias, res in combos:
            out.append((np.float32, act, bias, res, i % len(EPI_CONVS)))
            i += 1
    for j, act in enumerate(ACTS):
        out.append((np.float64, act, True, True, j % len(EPI_CONVS)))
    for j, act in enumerate(ACTIVATIONS):
        out.append((np.float16, act, True, True, (j + 1) % len(EPI_CONVS)))
    out.append((np.float16, "relu6", False, True, 0))
    return out


EPI = _epi_cases()


def epi_data(c, dtype, bias, residual, salt=0):
    c = dataclasses.replace(c, bias=bias)
    rng = rng_for("epi" + c.label(), salt)
    x, w, b = make_data(c, dtype, rng)
    r = rng.standard_normal(c.out_shape()).astype(dtype) * 2 if residual else None
    return c, x, w, b, r


def check_fused(c, dtype, x, w, b, r, act, label, y=None):
    dtype = np.dtype(dtype)
    kw = c.kwargs()
    if y is None:
        y = clconv.conv2d(x, w, b, **kw, activation=act, residual=r)
    ref = conv2d_fused_reference(x, w, b, r, act, **kw)
    tol = fused_tolerance(dtype, x, w, b, r, act, **kw)
    assert_within(y, ref, tol, dtype=dtype, label=f"{label} vs reference")
    if HAVE_TORCH and dtype in (np.float32, np.float64):
        z = torch.from_numpy(torch_conv2d(x, w, b, c))
        if r is not None:
            z = z + torch.from_numpy(r)
        t = z if act is None else getattr(torch.nn.functional, act)(z)
        assert_within(y, t.numpy(), 2.0 * tol, dtype=dtype, label=f"{label} vs torch")
    return y


@pytest.mark.parametrize("dtype,act,bias,res,ci", EPI,
                         ids=[f"{np.dtype(d).name}-{a}-{'b' if b else 'nob'}-"
                              f"{'res' if r else 'nores'}-c{ci}" for d, a, b, r, ci in EPI])
def test_fused_epilogue(dtype, act, bias, res, ci, has_fp64):
    _need_fp64(dtype, has_fp64)
    c, x, w, b, r = epi_data(EPI_CONVS[ci], dtype, bias, res)
    z = conv2d_fused_reference(x, w, b, r, None, **c.kwargs())
    if act == "relu6":  # the data crosses both kinks
        assert (z < 0).any() and (z > 6).any()
    y = check_fused(c, dtype, x, w, b, r, act, f"{c.label()} {np.dtype(dtype).name} act={act}")
    assert y.shape == c.out_shape()


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_fused_epilogue_nonfinite_residual(act):
    """NaN and +-inf reaching the activation behave as in torch (relu(NaN) is NaN, not 0)."""
    c, x, w, b, r = epi_data(EPI_CONVS[0], np.float32, True, True)   # a kernel already built
    lead = (0,) * (r.ndim - 3)
    r[lead + (0, 0, 0)] = np.nan
    r[lead + (1, 2, 3)] = np.inf
    r[lead + (2, 3, 1)] = -np.inf
    y = clconv.conv2d(x, w, b, **c.kwargs(), activation=act, residual=r)
    ref = conv2d_fused_reference(x, w, b, r, act, **c.kwargs())
    expected = [("reference", ref)]
    if HAVE_TORCH:
        # in float64: torch's vectorised float32 gelu gives NaN for +inf (its scalar and
        # float64 paths, and the math, give +inf)
        x64, w64, b64, r64 = (a.astype(np.float64) for a in (x, w, b, r))
        z = torch.from_numpy(torch_conv2d(x64, w64, b64, c)) + torch.from_numpy(r64)
        expected.append(("torch", getattr(torch.nn.functional, act)(z).numpy()))
    for name, e in expected:
        for what, f in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
            diff = f(y) != f(e)
            assert not diff.any(), (
                f"act={act}: {what} positions differ from {name} at "
                f"{[tuple(map(int, i)) for i in np.argwhere(diff)[:5]]} "
                f"(got {y[diff][:5]}, {name} {e[diff][:5]})")
        fin = np.isfinite(e)
        assert np.array_equal(y[~fin & ~np.isnan(e)], e[~fin & ~np.isnan(e)])
    # finite-but-saturated values at the nonfinite positions (e.g. relu6(inf) = 6)
    for idx in (lead + (1, 2, 3), lead + (2, 3, 1)):
        assert y[idx] == ref[idx] or (np.isnan(y[idx]) and np.isnan(ref[idx])), (act, idx)


def test_fused_epilogue_device_arrays(queue):
    c, x, w, b, r = epi_data(EPI_CONVS[1], np.float32, True, True)   # a kernel already built
    dev = [cl_array.to_device(queue, a) for a in (x, w, b, r)]
    y = clconv.conv2d(dev[0], dev[1], dev[2], **c.kwargs(), activation="relu", residual=dev[3])
    assert isinstance(y, cl_array.Array) and y.queue is queue
    check_fused(c, np.float32, x, w, b, r, "relu", "device", y=y.get())
    np.testing.assert_array_equal(dev[3].get(), r)     # residual untouched
    # a non-contiguous device residual
    big = cl_array.to_device(queue, np.repeat(r, 2, axis=-1))
    rv = big[:, :, :, ::2]
    assert not rv.flags.c_contiguous
    y = clconv.conv2d(dev[0], dev[1], dev[2], **c.kwargs(), activation="relu", residual=rv)
    check_fused(c, np.float32, x, w, b, r, "relu", "device view residual", y=y.get())


def test_fused_epilogue_noncontiguous_host_residual():
    c, x, w, b, r = epi_data(EPI_CONVS[0], np.float32, True, True)
    rv = np.repeat(r, 2, axis=-1)[..., ::2]
    assert not rv.flags.c_contiguous
    check_fused(c, np.float32, x, w, b, rv, "silu", "host view residual")


def test_fused_epilogue_batch_zero():
    c = dataclasses.replace(EPI_CONVS[0], n=0)
    x, w, b = make_data(c, np.float32)
    r = np.zeros(c.out_shape(), np.float32)
    y = clconv.conv2d(x, w, b, **c.kwargs(), activation="gelu", residual=r)
    assert isinstance(y, np.ndarray) and y.shape == c.out_shape() and y.dtype == np.float32
    with pytest.raises(ValueError, match="residual"):
        clconv.conv2d(x, w, b, **c.kwargs(), activation="gelu",
                      residual=np.zeros((1,) + c.out_shape()[1:], np.float32))


def test_fused_epilogue_residual_validation():
    c, x, w, b, r = epi_data(EPI_CONVS[0], np.float32, True, True)
    kw = c.kwargs()
    for bad in (r[:, :, :-1], r[:1], r[0], r[..., None], np.ones(r.shape[1:] + (2,), np.float32)):
        with pytest.raises(ValueError, match="residual"):
            clconv.conv2d(x, w, b, **kw, activation="relu", residual=bad)
    for dt in (np.float16, np.float64):
        with pytest.raises(TypeError, match="residual"):
            clconv.conv2d(x, w, b, **kw, residual=r.astype(dt))
    with pytest.raises(TypeError, match="residual"):
        clconv.conv2d(x, w, b, **kw, residual=r.astype(np.int32))
    # unbatched input wants an unbatched residual
    with pytest.raises(ValueError, match="residual"):
        clconv.conv2d(x[0], w, b, **kw, residual=r)


@pytest.mark.parametrize("bad", ["tanh", "", "ReLU ", "gelu_tanh", "none"])
def test_invalid_activation_name(bad):
    c, x, w, b, _ = epi_data(EPI_CONVS[0], np.float32, True, False)
    with pytest.raises(ValueError, match="activation"):
        clconv.conv2d(x, w, b, **c.kwargs(), activation=bad)


def test_invalid_activation_type():
    c, x, w, b, _ = epi_data(EPI_CONVS[0], np.float32, True, False)
    for bad in (1, lambda z: z, ("relu",)):
        with pytest.raises((ValueError, TypeError), match="activation"):
            clconv.conv2d(x, w, b, **c.kwargs(), activation=bad)
