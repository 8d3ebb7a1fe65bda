"""Shared, deterministic test-case helpers (no dependency on clconv internals)."""

from __future__ import annotations

import dataclasses
import importlib.util
import zlib
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from reference import pair, resolve_padding, output_size

IntOrPair = Union[int, Tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Conv:
    """One convolution problem.  ``n=None`` means unbatched (C, H, W) input."""

    n: Optional[int]
    cin: int
    h: int
    w: int
    cout: int
    k: IntOrPair
    stride: IntOrPair = 1
    padding: Union[IntOrPair, str] = 0
    dilation: IntOrPair = 1
    groups: int = 1
    bias: bool = True
    mode: str = "zeros"

    @property
    def kh(self):
        return pair(self.k)[0]

    @property
    def kw(self):
        return pair(self.k)[1]

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, padding_mode=self.mode)

    def x_shape(self):
        s = (self.cin, self.h, self.w)
        return s if self.n is None else (self.n,) + s

    def w_shape(self):
        return (self.cout, self.cin // self.groups, self.kh, self.kw)

    def out_hw(self):
        (pt, pb), (pl, pr) = resolve_padding(self.padding, self.k, self.stride, self.dilation)
        sh, sw = pair(self.stride)
        dh, dw = pair(self.dilation)
        return (output_size(self.h, pt, pb, self.kh, sh, dh),
                output_size(self.w, pl, pr, self.kw, sw, dw))

    def out_shape(self):
        s = (self.cout,) + self.out_hw()
        return s if self.n is None else (self.n,) + s

    def label(self):
        def f(v):
            if isinstance(v, tuple):
                return f"{v[0]}x{v[1]}" if len(v) == 2 else "x".join(map(str, v))
            return str(v)
        n = "U" if self.n is None else str(self.n)
        return (f"N{n}_C{self.cin}to{self.cout}_{self.h}x{self.w}_k{f(self.k)}_s{f(self.stride)}"
                f"_p{f(self.padding)}_d{f(self.dilation)}_g{self.groups}_{self.mode}"
                f"_{'b' if self.bias else 'nob'}")


def rng_for(label: str, salt: int = 0) -> np.random.Generator:
    """A generator seeded from a stable hash of ``label`` (deterministic across runs)."""
    return np.random.default_rng([zlib.crc32(label.encode()), salt])


def make_data(c: Conv, dtype=np.float32, rng=None, dist="normal"):
    """Random (x, w, b) for ``c`` with the given dtype (b is None without bias)."""
    rng = rng_for(c.label()) if rng is None else rng
    if dist == "normal":
        x = rng.standard_normal(c.x_shape())
        w = rng.standard_normal(c.w_shape())
        b = rng.standard_normal(c.cout) if c.bias else None
    elif dist == "int":  # small integers: every direct summation is exact
        x = rng.integers(-4, 5, c.x_shape()).astype(np.float64)
        w = rng.integers(-4, 5, c.w_shape()).astype(np.float64)
        b = rng.integers(-8, 9, c.cout).astype(np.float64) if c.bias else None
    else:
        raise ValueError(dist)
    x = x.astype(dtype)
    w = w.astype(dtype)
    b = None if b is None else b.astype(dtype)
    return x, w, b


def torch_conv2d(x, w, b, c: Conv):
    """torch.nn.Conv2d forward with the given numpy weights (dtype kept)."""
    import torch

    dt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(x.dtype)]
    m = torch.nn.Conv2d(c.cin, c.cout, (c.kh, c.kw), stride=c.stride, padding=c.padding,
                        dilation=c.dilation, groups=c.groups, bias=c.bias,
                        padding_mode=c.mode, dtype=dt)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        if c.bias:
            m.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
        return m(torch.from_numpy(np.ascontiguousarray(x))).numpy()


# ---------------------------------------------------------------------------
# Random sweep configurations (valid by construction)
# ---------------------------------------------------------------------------

SWEEP_SEED = 20251124
SWEEP_COUNT = 260


def _maybe_int(rng, a, b):
    """Return int a if a == b and a coin flip says so, else the pair."""
    if a == b and rng.random() < 0.6:
        return int(a)
    return (int(a), int(b))


def random_conv(rng: np.random.Generator) -> Conv:
    # Channels / groups.
    kind = rng.choice(["dense", "dense", "dense", "grouped", "depthwise", "multiplier"])
    if kind == "dense":
        groups, cin, cout = 1, int(rng.integers(1, 10)), int(rng.integers(1, 10))
    elif kind == "grouped":
        groups = int(rng.choice([2, 3, 4]))
        cin = groups * int(rng.integers(1, 4))
        cout = groups * int(rng.integers(1, 4))
    elif kind == "depthwise":
        cin = int(rng.integers(1, 10))
        groups, cout = cin, cin
    else:
        cin = int(rng.integers(1, 7))
        groups, cout = cin, cin * int(rng.integers(2, 4))

    # Kernel, dilation.
    ks = [1, 2, 3, 3, 3, 4, 5, 5, 6, 7]
    kh = int(rng.choice(ks + [11]))
    kw = kh if rng.random() < 0.5 else int(rng.choice(ks))
    dils = [1, 1, 1, 2, 3]
    dh = int(rng.choice(dils)) if kh < 11 else 1
    dw = dh if rng.random() < 0.6 else int(rng.choice(dils))
    if kw == 11:
        dw = 1

    # Padding form (decides whether stride must be 1).
    form = rng.choice(["int", "pair", "valid", "same", "same"])
    if form == "same":
        sh = sw = 1
    else:
        sh = int(rng.choice([1, 1, 2, 3]))
        sw = sh if rng.random() < 0.5 else int(rng.choice([1, 2, 3]))
    stride = _maybe_int(rng, sh, sw)
    dilation = _maybe_int(rng, dh, dw)
    k = _maybe_int(rng, kh, kw)
    if form == "int":
        padding = int(rng.integers(0, 4))
    elif form == "pair":
        padding = (int(rng.integers(0, 5)), int(rng.integers(0, 5)))
    else:
        padding = str(form)

    mode = str(rng.choice(["zeros", "reflect", "replicate", "circular"]))
    (pt, pb), (pl, pr) = resolve_padding(padding, (kh, kw), (sh, sw), (dh, dw))

    def size(k_, d_, lo, hi):
        extent = d_ * (k_ - 1) + 1
        lo_size = max(1, extent - lo - hi)
        if mode == "reflect":
            lo_size = max(lo_size, max(lo, hi) + 1)
        elif mode == "circular":
            lo_size = max(lo_size, max(lo, hi))
        return lo_size + int(rng.integers(0, 7))

    h = size(kh, dh, pt, pb)
    w = size(kw, dw, pl, pr)
    n = [None, 0, 1, 2, 3][int(rng.choice(5, p=[0.14, 0.04, 0.34, 0.3, 0.18]))]
    bias = bool(rng.random() < 0.6)
    return Conv(n, cin, h, w, cout, k, stride, padding, dilation, groups, bias, mode)


def sweep_configs(count: int = SWEEP_COUNT, seed: int = SWEEP_SEED):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        c = random_conv(rng)
        layout = str(rng.choice(["contiguous"] * 8 + ["x_view", "w_view"]))
        out.append((f"r{i:03d}_{c.label()}_{layout}", c, layout))
    return out


def apply_layout(x, w, layout, rng):
    """Return non-contiguous views equal to x / w for the named layout."""
    if layout == "x_view":
        # Channels-last storage + transposed view, then a stride-2 slice along W.
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1] + 1,), dtype=x.dtype)
        big[..., 1::2] = x
        x2 = big[..., 1::2]
        assert not x2.flags.c_contiguous or x2.size <= 1
        np.testing.assert_array_equal(x2, x)
        return x2, w
    if layout == "w_view":
        w2 = np.ascontiguousarray(w[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]
        w2 = np.asfortranarray(w2) if w2.ndim == 4 and rng.random() < 0.5 else w2
        np.testing.assert_array_equal(w2, w)
        return x, w2
    return x, w


def load_example(name):
    """The module examples/<name>.py, loaded from the checkout."""
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
