"""Every process setting of clconv, each read from its environment variable unless a setter
overrode it in this process. Plans are memoised per setting (planner), so a change applies
at the next call.

- The tuning mode (CLCONV_TUNE, set_tune_mode):
  - off: heuristics only;
  - cached (default): a tuned entry when one exists (the user's cache, else a shipped
    database), heuristics otherwise;
  - on: like cached, but a problem missing from the user's cache is tuned at its first use
    (like cuDNN's benchmark mode), then remembered.
- The tuning budget per problem (CLCONV_TUNE_BUDGET seconds, default 20).
- allow_winograd (CLCONV_ALLOW_WINOGRAD, set_allow_winograd; off by default, like
  torch.backends.cudnn.allow_tf32): 3x3 stride-1 undilated convolutions may use Winograd
  F(2x2, 3x3), 2.25x fewer multiplies. It rounds differently from the direct sum (errors a
  few times larger, still far within float32's bounds for ordinary data), and an inf or NaN
  in the input spreads to every output of the 2x2 tiles whose 4x4 input patch holds it
  (torch: only the outputs whose 3x3 window does).
- The size of the per-context memo tables (CLCONV_MEMO_SIZE, default 512): built programs,
  built launches and plans are each kept for the most recently used that many (a built
  program holds about 1 MiB of the driver's memory on PoCL), so a process that meets ever
  new shapes stays bounded; an evicted one is rebuilt from pyopencl's disk cache if met again.
- The forced algorithms of planner.use_algorithm (no environment variable): per operation,
  an (algorithm name, parameters) pair that every plan of that operation uses.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

TUNING_MODES = ("off", "cached", "on")
DEFAULT_BUDGET = 20.0       # seconds per problem
DEFAULT_MEMO_SIZE = 512     # entries per memo table and context

_settings = {"tuning_mode": None, "allow_winograd": None}   # None: follow the environment
_forced: dict = {}          # operation -> (algorithm name, {param: value})


@contextmanager
def _setting_set_to(key, value, setter):
    saved = _settings[key]
    setter(value)
    try:
        yield
    finally:
        _settings[key] = saved


# --- the tuning mode -------------------------------------------------------------------------

def tuning_mode():
    """The tuning mode in force: set_tune_mode()'s, else CLCONV_TUNE's, else 'cached'."""
    value = _settings["tuning_mode"] or os.environ.get("CLCONV_TUNE") or "cached"
    if value not in TUNING_MODES:
        raise ValueError(f"CLCONV_TUNE must be one of {TUNING_MODES}, got {value!r}")
    return value


def set_tune_mode(value):
    """Set the tuning mode for this process ('off', 'cached', 'on'); None: back to
    CLCONV_TUNE."""
    if value is not None and value not in TUNING_MODES:
        raise ValueError(f"tuning mode must be one of {TUNING_MODES} or None, got {value!r}")
    _settings["tuning_mode"] = value


def tuning_mode_set_to(value):
    """A block in which the tuning mode is value (then back to what it was)."""
    return _setting_set_to("tuning_mode", value, set_tune_mode)


def default_budget():
    """CLCONV_TUNE_BUDGET seconds per problem, else DEFAULT_BUDGET."""
    text = os.environ.get("CLCONV_TUNE_BUDGET")
    if not text:
        return DEFAULT_BUDGET
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise ValueError(f"CLCONV_TUNE_BUDGET must be a positive number of seconds, got {text!r}")
    return value


def check_budget(budget):
    """A tuning budget argument in seconds (None: default_budget())."""
    if budget is None:
        return default_budget()
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
    return float(budget)


def memo_size():
    """CLCONV_MEMO_SIZE (a positive integer), else DEFAULT_MEMO_SIZE."""
    text = os.environ.get("CLCONV_MEMO_SIZE")
    if not text:
        return DEFAULT_MEMO_SIZE
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"CLCONV_MEMO_SIZE must be a positive integer, got {text!r}")
    return int(text)


# --- Winograd --------------------------------------------------------------------------------

def allow_winograd() -> bool:
    """Whether Winograd may be chosen: set_allow_winograd()'s value, else
    CLCONV_ALLOW_WINOGRAD ('1' or '0'), else False."""
    if _settings["allow_winograd"] is not None:
        return _settings["allow_winograd"]
    text = os.environ.get("CLCONV_ALLOW_WINOGRAD", "0")
    if text not in ("0", "1"):
        raise ValueError(f"CLCONV_ALLOW_WINOGRAD must be '0' or '1', got {text!r}")
    return text == "1"


def set_allow_winograd(flag):
    """Allow (True) or forbid (False) Winograd for this process; None: back to
    CLCONV_ALLOW_WINOGRAD. Plans are memoised per setting, so a change applies at once."""
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"flag must be True, False or None, got {flag!r}")
    _settings["allow_winograd"] = flag


def winograd_allowed(flag=True):
    """A block in which allow_winograd() is flag (then back to what was set)."""
    return _setting_set_to("allow_winograd", flag, set_allow_winograd)


# --- forced algorithms (planner.use_algorithm checks them) -----------------------------------

def forced(operation):
    """(algorithm name, params) forced for operation, or None."""
    return _forced.get(operation)


@contextmanager
def forcing(operation, choice):
    """A block in which forced(operation) is choice (an already validated pair)."""
    saved = _forced.get(operation)
    _forced[operation] = choice
    try:
        yield
    finally:
        if saved is None:
            _forced.pop(operation, None)
        else:
            _forced[operation] = saved
