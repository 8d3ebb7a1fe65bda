"""Seeded random sweep of valid-by-construction conv2d configurations.

Each configuration (see tests/_cases.py: random_conv / sweep_configs) draws
kernel size (1-7, 11, non-square), stride, dilation, padding in every form
(int, pair, 'valid', 'same'), padding mode, groups (dense, grouped, depthwise,
depthwise multiplier), bias, batch (including 0 and unbatched), channel
counts and a memory layout (contiguous or non-contiguous views), and is
compared in float32 with the NumPy reference within the rounding bound.
The test id spells the whole configuration.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clconv  # noqa: E402

from reference import assert_matches  # noqa: E402
from _cases import apply_layout, make_data, rng_for, sweep_configs  # noqa: E402

SWEEP = sweep_configs()


@pytest.mark.parametrize("case_id,c,layout", SWEEP, ids=[i for i, _, _ in SWEEP])
def test_random_config(case_id, c, layout):
    rng = rng_for(case_id)
    x, w, b = make_data(c, np.float32, rng)
    x, w = apply_layout(x, w, layout, rng)
    y = clconv.conv2d(x, w, b, **c.kwargs())
    assert isinstance(y, np.ndarray), f"{case_id}: got {type(y)}"
    assert y.shape == c.out_shape(), f"{case_id}: shape {y.shape}, expected {c.out_shape()}"
    assert_matches(y, x, w, b, dtype=np.float32, label=case_id, **c.kwargs())
