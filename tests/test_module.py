"""clconv.Conv2d behaves like torch.nn.Conv2d: attributes, parameters and their
initialisation, repr, state_dict, from_torch, live weights, batching and dtype conversion."""

import numpy as np
import pytest
import torch

import clconv

F32 = np.float32


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                np.dtype(np.float64): torch.float64}


def torch_twin(m, dtype=None):
    """A torch.nn.Conv2d with m's configuration and (a copy of) m's current parameters."""
    dtype = np.dtype(dtype or m.weight.dtype)
    t = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                        padding=m.padding, dilation=m.dilation, groups=m.groups,
                        bias=m.bias is not None, padding_mode=m.padding_mode,
                        dtype=TORCH_DTYPES[dtype])
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(np.asarray(m.weight, dtype)))
        if m.bias is not None:
            t.bias.copy_(torch.from_numpy(np.asarray(m.bias, dtype)))
    return t


def torch_forward(t, x):
    with torch.no_grad():
        return t(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def assert_close(y, t, rel=1e-4):
    assert y.shape == t.shape, (y.shape, t.shape)
    scale = max(1.0, float(np.abs(t).max(initial=0.0)))
    np.testing.assert_allclose(y, t, rtol=rel, atol=rel * scale)


def data(shape, dtype=F32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# (args, kwargs) for both constructors
CONFIGS = {
    "plain": ((3, 4, 3), {}),
    "pair_kernel": ((3, 4, (3, 5)), {}),
    "list_kernel_stride": ((3, 4, [2, 3]), dict(stride=[2, 1])),
    "stride_padding": ((4, 8, 3), dict(stride=2, padding=1)),
    "padding_pair": ((3, 6, (3, 1)), dict(padding=(1, 0))),
    "padding_zero_pair": ((3, 6, 3), dict(padding=(0, 0))),
    "padding_same": ((3, 4, 4), dict(padding="same", dilation=2)),
    "padding_valid": ((3, 4, 3), dict(padding="valid", stride=(1, 2))),
    "dilation": ((2, 4, 3), dict(dilation=(2, 3), padding=2)),
    "groups": ((4, 8, 3), dict(groups=2, padding=1)),
    "depthwise": ((4, 12, 3), dict(groups=4, bias=False)),
    "no_bias": ((3, 5, 1), dict(bias=False)),
    "reflect": ((3, 4, 3), dict(padding=1, padding_mode="reflect")),
    "replicate_same": ((3, 4, 5), dict(padding="same", padding_mode="replicate")),
    "circular": ((2, 4, (2, 3)), dict(padding=(1, 2), padding_mode="circular")),
    "everything": ((6, 9, (3, 2)), dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2),
                                        groups=3, bias=False, padding_mode="reflect")),
}
CONFIG_IDS = list(CONFIGS)


def both(case):
    args, kwargs = CONFIGS[case]
    return clconv.Conv2d(*args, **kwargs), torch.nn.Conv2d(*args, **kwargs)


def input_for(m, batch=2, hw=(9, 8), seed=0):
    return data((batch, m.in_channels) + hw, seed=seed)


# --------------------------------------------------------------------------------------------
# attributes, parameters, repr
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CONFIG_IDS)
def test_attributes_match_torch(case):
    m, t = both(case)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(m, name) == getattr(t, name), name
        assert type(getattr(m, name)) is type(getattr(t, name)), name
    assert isinstance(m.kernel_size, tuple) and isinstance(m.stride, tuple)
    assert isinstance(m.dilation, tuple)
    assert isinstance(m.padding, (tuple, str))


@pytest.mark.parametrize("case", CONFIG_IDS)
def test_parameters_shape_and_dtype(case):
    m, t = both(case)
    assert isinstance(m.weight, np.ndarray) and m.weight.dtype == np.float32
    assert m.weight.shape == tuple(t.weight.shape)
    if t.bias is None:
        assert m.bias is None
        assert len(m.parameters()) == 1 and m.parameters()[0] is m.weight
    else:
        assert isinstance(m.bias, np.ndarray) and m.bias.dtype == np.float32
        assert m.bias.shape == tuple(t.bias.shape)
        assert len(m.parameters()) == 2
        assert m.parameters()[0] is m.weight and m.parameters()[1] is m.bias


@pytest.mark.parametrize("case", CONFIG_IDS)
def test_repr_matches_torch(case):
    m, t = both(case)
    assert repr(m) == repr(t)


@pytest.mark.parametrize("args,kwargs", [((64, 128, 3), {}), ((64, 128, (3, 5)), dict(groups=8)),
                                         ((16, 1024, 1), dict(groups=16))])
def test_initialisation_bounds(args, kwargs):
    np.random.seed(0)
    m = clconv.Conv2d(*args, **kwargs)
    in_channels, _, _ = args
    kh, kw = m.kernel_size
    fan_in = in_channels // m.groups * kh * kw
    bound = 1.0 / np.sqrt(fan_in)
    tol = bound * 1e-6                 # float32 rounding of the float64 draw
    for p in (m.weight, m.bias):
        assert np.abs(p).max() <= bound + tol
    w = m.weight.ravel().astype(np.float64)
    n = w.size
    # roughly uniform on [-bound, bound]: the extremes reach the bound, mean 0,
    # variance bound^2 / 3, and a flat histogram
    assert np.abs(w).max() > bound * (1 - 20.0 / n)
    assert w.min() < -bound * 0.99 and w.max() > bound * 0.99
    assert abs(w.mean()) < 6 * bound / np.sqrt(3 * n)
    assert abs(w.std() - bound / np.sqrt(3)) < 0.02 * bound
    counts, _ = np.histogram(w, bins=10, range=(-bound, bound))
    assert np.all(np.abs(counts - n / 10) < 6 * np.sqrt(n / 10)), counts
    # torch's layer draws from the same range
    t = torch.nn.Conv2d(*args, **kwargs)
    tw = t.weight.detach().numpy()
    assert np.abs(tw).max() <= bound + tol
    assert abs(np.abs(tw).max() - np.abs(m.weight).max()) < 0.01 * bound
    assert abs(np.abs(t.bias.detach().numpy()).max() - np.abs(m.bias).max()) < 0.2 * bound


def test_new_modules_get_different_weights():
    a, b = clconv.Conv2d(3, 8, 3), clconv.Conv2d(3, 8, 3)
    assert not np.array_equal(a.weight, b.weight)
    assert not np.array_equal(a.bias, b.bias)


def test_np_random_seed_makes_initialisation_reproducible():
    np.random.seed(1234)
    a = clconv.Conv2d(3, 8, 3, groups=1)
    c = clconv.Conv2d(4, 4, 2, groups=2, bias=False)
    np.random.seed(1234)
    b = clconv.Conv2d(3, 8, 3, groups=1)
    d = clconv.Conv2d(4, 4, 2, groups=2, bias=False)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    np.testing.assert_array_equal(c.weight, d.weight)
    np.random.seed(4321)
    e = clconv.Conv2d(3, 8, 3)
    assert not np.array_equal(a.weight, e.weight)


# --------------------------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_keys_match_torch(bias):
    m = clconv.Conv2d(3, 4, 3, bias=bias)
    t = torch.nn.Conv2d(3, 4, 3, bias=bias)
    assert list(m.state_dict()) == list(t.state_dict())
    assert list(m.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    assert m.state_dict()["weight"] is m.weight
    for key, value in m.state_dict().items():
        assert value.shape == tuple(t.state_dict()[key].shape)


@pytest.mark.parametrize("case", ["plain", "groups", "no_bias", "padding_same", "circular"])
def test_load_state_dict_from_torch(case):
    m, t = both(case)
    result = m.load_state_dict(t.state_dict())
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    np.testing.assert_array_equal(m.weight, t.weight.detach().numpy())
    if t.bias is not None:
        np.testing.assert_array_equal(m.bias, t.bias.detach().numpy())
    assert m.weight.dtype == np.float32
    x = input_for(m, seed=1)
    assert_close(m(x), torch_forward(t, x))


def test_load_state_dict_numpy_and_torch_to_clconv_and_back():
    m, t = both("stride_padding")
    m.load_state_dict({k: v.detach().numpy().copy() for k, v in t.state_dict().items()})
    t2 = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)
    t2.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    x = input_for(m, seed=2)
    assert_close(m(x), torch_forward(t2, x))
    assert_close(torch_forward(t, x), torch_forward(t2, x))


def test_load_state_dict_strict_key_mismatch_raises():
    m = clconv.Conv2d(3, 4, 3)
    t = torch.nn.Conv2d(3, 4, 3)
    before = m.weight.copy()
    sd = t.state_dict()
    missing = {"weight": sd["weight"]}
    unexpected = dict(sd, extra=torch.zeros(1))
    for bad, word in ((missing, "missing"), (unexpected, "unexpected")):
        with pytest.raises(KeyError, match=word):
            m.load_state_dict(bad)
        with pytest.raises(RuntimeError):
            torch.nn.Conv2d(3, 4, 3).load_state_dict(bad)     # torch raises too
    np.testing.assert_array_equal(m.weight, before)          # nothing was loaded
    # bias=False module fed a state_dict with a bias
    with pytest.raises(KeyError, match="unexpected"):
        clconv.Conv2d(3, 4, 3, bias=False).load_state_dict(sd)


def test_load_state_dict_non_strict_reports_keys_like_torch():
    t_src = torch.nn.Conv2d(3, 4, 3)
    bad = {"weight": t_src.state_dict()["weight"], "extra": torch.zeros(1)}
    m = clconv.Conv2d(3, 4, 3)
    t = torch.nn.Conv2d(3, 4, 3)
    r = m.load_state_dict(bad, strict=False)
    rt = t.load_state_dict(bad, strict=False)
    assert list(r.missing_keys) == list(rt.missing_keys) == ["bias"]
    assert list(r.unexpected_keys) == list(rt.unexpected_keys) == ["extra"]
    np.testing.assert_array_equal(m.weight, t_src.weight.detach().numpy())


def test_load_state_dict_wrong_shape_raises():
    m = clconv.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"state_dict\['weight'\] has shape"):
        m.load_state_dict({"weight": torch.zeros(4, 3, 5, 5), "bias": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"state_dict\['bias'\] has shape"):
        m.load_state_dict({"weight": torch.zeros(4, 3, 3, 3), "bias": torch.zeros(5)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        torch.nn.Conv2d(3, 4, 3).load_state_dict({"weight": torch.zeros(4, 3, 5, 5),
                                                   "bias": torch.zeros(4)})


# --------------------------------------------------------------------------------------------
# from_torch and forward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "stride_padding", "padding_same", "padding_valid",
                                  "dilation", "groups", "depthwise", "reflect", "replicate_same",
                                  "circular", "everything"])
def test_from_torch_matches_torch(case):
    args, kwargs = CONFIGS[case]
    t = torch.nn.Conv2d(*args, **kwargs)
    m = clconv.Conv2d.from_torch(t)
    assert repr(m) == repr(t)
    np.testing.assert_array_equal(m.weight, t.weight.detach().numpy())
    x = input_for(m, seed=3)
    y = m(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert_close(y, torch_forward(t, x))
    # the copy is independent of the torch module
    with torch.no_grad():
        t.weight.zero_()
    assert np.abs(m.weight).max() > 0


def test_from_torch_padding_same_reflect_even_kernel():
    t = torch.nn.Conv2d(3, 5, (4, 2), padding="same", dilation=(1, 3), padding_mode="reflect")
    m = clconv.Conv2d.from_torch(t)
    x = data((2, 3, 7, 6), seed=4)
    assert_close(m(x), torch_forward(t, x))


def test_call_is_forward():
    m = clconv.Conv2d(3, 4, 3, padding=1)
    x = data((2, 3, 6, 7), seed=5)
    np.testing.assert_array_equal(m(x), m.forward(x))


def test_accepts_torch_tensor_input():
    t = torch.nn.Conv2d(3, 4, 3)
    m = clconv.Conv2d.from_torch(t)
    x = torch.randn(2, 3, 6, 6)
    assert_close(m(x), torch_forward(t, x.numpy()))


# --------------------------------------------------------------------------------------------
# live parameters
# --------------------------------------------------------------------------------------------

def test_in_place_weight_edit_takes_effect():
    m = clconv.Conv2d(3, 4, 3, padding=1)
    x = data((2, 3, 6, 6), seed=6)
    y0 = m(x)                                     # warm the device copy of the parameters
    assert_close(y0, torch_forward(torch_twin(m), x))
    m.weight[...] *= 2
    y1 = m(x)
    assert_close(y1, torch_forward(torch_twin(m), x))
    assert_close(y1 - m.bias[:, None, None], 2 * (y0 - m.bias[:, None, None]))
    m.weight[0, 0, 1, 1] += 1.0                   # a single element
    assert_close(m(x), torch_forward(torch_twin(m), x))


def test_weight_reassignment_takes_effect():
    m = clconv.Conv2d(3, 4, 3)
    x = data((1, 3, 5, 5), seed=7)
    m(x)
    m.weight = data((4, 3, 3, 3), seed=8)
    assert_close(m(x), torch_forward(torch_twin(m), x))
    m.weight = np.asfortranarray(data((4, 3, 3, 3), seed=9))      # any layout
    assert_close(m(x), torch_forward(torch_twin(m), x))


def test_bias_edits_take_effect():
    m = clconv.Conv2d(3, 4, 3)
    x = data((1, 3, 5, 5), seed=10)
    m(x)
    m.bias[:] = 0
    y = m(x)
    assert_close(y, torch_forward(torch_twin(m), x))
    m.bias = np.arange(4, dtype=F32)
    assert_close(m(x), y + np.arange(4, dtype=F32)[:, None, None])
    m.bias = None                               # as torch allows
    assert_close(m(x), y)
    assert list(m.state_dict()) == ["weight"]


def test_load_state_dict_takes_effect_after_a_call():
    m = clconv.Conv2d(3, 4, 3)
    x = data((1, 3, 5, 5), seed=11)
    m(x)
    t = torch.nn.Conv2d(3, 4, 3)
    m.load_state_dict(t.state_dict())
    assert_close(m(x), torch_forward(t, x))


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "padding_same", "reflect", "groups"])
def test_unbatched_input_gives_unbatched_output(case):
    m, t = both(case)
    m.load_state_dict(t.state_dict())
    x = data((m.in_channels, 7, 6), seed=12)
    y = m(x)
    ref = torch_forward(t, x)
    assert y.ndim == 3 and y.shape == ref.shape
    assert_close(y, ref)
    np.testing.assert_array_equal(y, m(x[None])[0])


@pytest.mark.parametrize("case", ["plain", "stride_padding", "padding_same", "dilation",
                                  "circular", "everything"])
def test_batch_zero_gives_empty_output(case):
    m, t = both(case)
    x = np.zeros((0, m.in_channels, 9, 8), F32)
    y = m(x)
    ref = torch_forward(t, x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y.shape == ref.shape
    assert y.shape[:2] == (0, m.out_channels)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------

def test_double(has_fp64):
    m = clconv.Conv2d(3, 4, 3, padding=1, groups=1)
    assert m.double() is m
    assert m.weight.dtype == np.float64 and m.bias.dtype == np.float64
    if not has_fp64:
        pytest.skip("device has no cl_khr_fp64")
    x = data((2, 3, 6, 5), np.float64, seed=13)
    y = m(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, torch_forward(torch_twin(m), x), rtol=1e-10, atol=1e-12)


def test_double_module_from_torch(has_fp64):
    if not has_fp64:
        pytest.skip("device has no cl_khr_fp64")
    t = torch.nn.Conv2d(2, 4, 3, padding="same", padding_mode="circular", dtype=torch.float64)
    m = clconv.Conv2d.from_torch(t)
    assert m.weight.dtype == np.float64
    x = data((1, 2, 5, 6), np.float64, seed=14)
    np.testing.assert_allclose(m(x), torch_forward(t, x), rtol=1e-10, atol=1e-12)


def test_float64_input_into_float32_module_raises():
    m = clconv.Conv2d(3, 4, 3)
    x = data((1, 3, 5, 5), np.float64)
    with pytest.raises(TypeError, match="dtype"):
        m(x)
    with pytest.raises(RuntimeError):
        torch_twin(m)(torch.from_numpy(x))        # torch rejects it too


def test_half_matches_torch_float32():
    m = clconv.Conv2d(8, 6, 3, padding=1, groups=2)
    assert m.half() is m
    assert m.weight.dtype == np.float16 and m.bias.dtype == np.float16
    x = data((2, 8, 7, 6), np.float16, seed=15)
    y = m(x)
    assert y.dtype == np.float16 and y.shape == (2, 6, 7, 6)
    ref = torch_forward(torch_twin(m, np.float32), x.astype(F32))   # exact up to float32
    # float16 storage of the output: half a unit in the last place, plus slack
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(y.astype(F32), ref, rtol=2e-3, atol=2e-3 * scale)


def test_half_then_float_round_trip():
    m = clconv.Conv2d(3, 4, 3)
    w16 = m.weight.astype(np.float16)
    m.half().float()
    assert m.weight.dtype == np.float32
    np.testing.assert_array_equal(m.weight, w16.astype(F32))
    x = data((1, 3, 5, 5), seed=16)
    assert_close(m(x), torch_forward(torch_twin(m), x))
