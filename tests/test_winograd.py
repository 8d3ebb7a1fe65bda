"""Winograd F(2x2, 3x3): an opt-in, off by default, and what changes when it is allowed.

Its correctness on every matrix case it applies to (three dtypes, against NumPy and torch)
is in test_algorithms.py, its kernels under Oclgrind in test_oclgrind.py.
"""
import warnings

import numpy as np
import pytest

import clconv
from clconv import algorithms, autotune, planner
from clconv import store as cache
from clconv.search import Tuner
from clconv.problem import make_problem

from reference import assert_matches, conv2d_reference


def problem_of(cin=16, cout=16, k=3, stride=1, dilation=1, n=1, h=10, w=9):
    return make_problem((n, cin, h, w), np.float32, (cout, cin, k, k), np.float32, None, None,
                        stride, 1, dilation, 1, "zeros")[0]


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """No opt-in from the environment, an empty cache, no databases (plans are keyed by
    them, so none made here is reused elsewhere)."""
    monkeypatch.delenv("CLCONV_ALLOW_WINOGRAD", raising=False)
    monkeypatch.setenv("CLCONV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "databases_dir", lambda: tmp_path / "no-databases")
    yield
    clconv.set_allow_winograd(None)


def big_layer_data(rng, n=2, c=64, size=12):
    x = rng.standard_normal((n, c, size, size)).astype(np.float32)
    w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
    return x, w


def test_off_by_default(queue):
    assert not clconv.allow_winograd()
    p = problem_of(64, 64)
    assert not algorithms.ALGORITHMS["winograd"].applies(p)
    assert algorithms.choose(p, clconv.device_info(queue.device))[0].name != "winograd"
    assert planner.chosen(p, queue)[0] != "winograd"
    assert "winograd" not in cache.signature(p)


def test_allowed_it_is_the_heuristic_choice_for_wide_3x3_layers(queue):
    x, w = big_layer_data(np.random.default_rng(0))
    with clconv.winograd_allowed():
        p = make_problem(x.shape, x.dtype, w.shape, w.dtype, None, None, 1, 1, 1, 1,
                         "zeros")[0]
        assert planner.chosen(p, queue)[0] == "winograd"
        y = clconv.conv2d(x, w, padding=1, queue=queue)
    assert_matches(y, x, w, padding=1)
    # The same call without the opt-in plans another algorithm (plans are per setting).
    assert planner.chosen(p, queue)[0] != "winograd"


@pytest.mark.parametrize("shape", [dict(k=5), dict(stride=2), dict(dilation=2),
                                   dict(cin=1, cout=1)])
def test_allowed_only_where_it_fits(shape):
    p = problem_of(**shape)
    with clconv.winograd_allowed():
        assert algorithms.ALGORITHMS["winograd"].preferred(p) is False
        if "cin" not in shape:
            assert not algorithms.ALGORITHMS["winograd"].applies(p)


def test_the_environment_and_the_setter(monkeypatch):
    monkeypatch.setenv("CLCONV_ALLOW_WINOGRAD", "1")
    assert clconv.allow_winograd()
    clconv.set_allow_winograd(False)
    assert not clconv.allow_winograd()
    with clconv.winograd_allowed():
        assert clconv.allow_winograd()
    assert not clconv.allow_winograd()
    clconv.set_allow_winograd(None)
    assert clconv.allow_winograd()
    monkeypatch.setenv("CLCONV_ALLOW_WINOGRAD", "yes")
    with pytest.raises(ValueError, match="CLCONV_ALLOW_WINOGRAD must be '0' or '1'"):
        clconv.allow_winograd()
    with pytest.raises(TypeError, match="flag must be True, False or None"):
        clconv.set_allow_winograd(1)


def test_tuning_with_it_allowed_is_remembered_apart(queue):
    p = problem_of(8, 8)
    with clconv.winograd_allowed():
        tuner = Tuner(p, queue)
        assert any(a.name == "winograd" for a, _ in tuner.candidates())
        signature = cache.signature(p)
        assert signature.endswith(" winograd n1")
        info = clconv.device_info(queue.device)
        config = algorithms.ALGORITHMS["winograd"].default_config(p, info)
        cache.record(info, {signature: {"algorithm": "winograd", "config": config, "ms": 1.0,
                                        "batch": 1}})
        assert autotune.tuned_choice(p, info)[0].name == "winograd"
    assert not any(a.name == "winograd" for a, _ in Tuner(p, queue).candidates())
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the entry is not even looked at
        assert autotune.tuned_choice(p, info) is None


def test_inf_spreads_within_its_tiles_only(queue):
    """An inf reaches every output of the 2x2 tiles whose 4x4 input patch holds it (torch:
    only outputs whose 3x3 window does); every other output is unchanged."""
    rng = np.random.default_rng(1)
    x, w = big_layer_data(rng, n=1, c=64, size=12)
    x[0, 5, 4, 7] = np.inf
    with clconv.winograd_allowed():
        assert planner.chosen(make_problem(x.shape, x.dtype, w.shape, w.dtype, None, None, 1,
                                           1, 1, 1, "zeros")[0], queue)[0] == "winograd"
        y = clconv.conv2d(x, w, padding=1, queue=queue)
    expected = conv2d_reference(x, w, padding=1)
    bad, torch_bad = ~np.isfinite(y), ~np.isfinite(expected)
    assert (bad | ~torch_bad).all(), "an output torch makes non-finite is finite"
    # Padded input (5, 8) lies in the 4x4 patches of tile rows 1-2 and tile columns 3-4:
    # output rows 2-5, columns 6-9.
    tiles = np.zeros(bad.shape[2:], bool)
    tiles[2:6, 6:10] = True
    assert not bad[0][:, ~tiles].any(), "the inf escaped its tiles"
    assert bad[0][:, tiles].any()
    finite = ~bad
    assert np.allclose(y[finite], expected[finite], rtol=1e-4, atol=1e-3)
