"""Numerical opt-ins, off by default (like torch.backends.cudnn.allow_tf32).

allow_winograd: 3x3 stride-1 undilated convolutions may use Winograd F(2x2, 3x3), 2.25x fewer
multiplies. It rounds differently from the direct sum (errors a few times larger, still far
within float32's bounds for ordinary data), and an inf or NaN in the input spreads to every
output of the 2x2 tiles whose 4x4 input patch holds it (torch: only the outputs whose 3x3
window does). Set it with set_allow_winograd() or CLCONV_ALLOW_WINOGRAD=1; winograd_allowed() is a
block with it set.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

_allow_winograd = None      # set_allow_winograd()'s choice; None follows the environment


def allow_winograd() -> bool:
    """Whether Winograd may be chosen: set_allow_winograd()'s value, else
    CLCONV_ALLOW_WINOGRAD ('1' or '0'), else False."""
    if _allow_winograd is not None:
        return _allow_winograd
    text = os.environ.get("CLCONV_ALLOW_WINOGRAD", "0")
    if text not in ("0", "1"):
        raise ValueError(f"CLCONV_ALLOW_WINOGRAD must be '0' or '1', got {text!r}")
    return text == "1"


def set_allow_winograd(flag):
    """Allow (True) or forbid (False) Winograd for this process; None: back to
    CLCONV_ALLOW_WINOGRAD. Plans are memoised per setting, so a change applies at once."""
    global _allow_winograd
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"flag must be True, False or None, got {flag!r}")
    _allow_winograd = flag


@contextmanager
def winograd_allowed(flag=True):
    """A block in which allow_winograd() is flag (then back to what was set)."""
    global _allow_winograd
    saved = _allow_winograd
    set_allow_winograd(flag)
    try:
        yield
    finally:
        _allow_winograd = saved
