"""Layer suites: named lists of torch.nn.Conv2d layers that `clconv bench` times and
`clconv tune` tunes. They ship as JSON in tuning/suites/ (clconv/layer_suites when installed):
`standard` (the benchmark suite), and the models `resnet50`, `mobilenet_v2`, `vgg16`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .paths import shipped_dir
from .problem import make_problem


def suites_dir() -> Path:
    return shipped_dir("layer_suites", "tuning/suites")


def suite_names():
    return sorted(p.stem for p in suites_dir().glob("*.json"))


def load_suite(name=None):
    """The layers of a named suite, or of a suite JSON file (default: 'standard')."""
    name = name or "standard"
    path = suites_dir() / f"{name}.json"
    if not path.is_file():
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"suite must be one of {suite_names()} or a JSON file, "
                             f"got {name!r}")
    try:
        with open(path, encoding="utf-8") as f:
            layers = json.load(f)["layers"]
        for layer in layers:
            layer_problem(layer)        # every layer must describe a valid convolution
    except (OSError, ValueError, TypeError, KeyError, IndexError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"suite file {path} is not a clconv layer suite (a JSON object "
                         f"whose 'layers' list the layers, as tuning/suites/*.json): "
                         f"{type(err).__name__}: {what}") from None
    return layers


def select_layers(suite=None, only=None):
    """The layers of a suite whose name contains only (all if None); none is an error."""
    layers = [l for l in load_suite(suite) if not only or only in l["name"]]
    if not layers:
        raise ValueError(f"--only {only!r} matches no layer of the suite {suite or 'standard'}")
    return layers


def layer_problem(layer, batch=None, dtype=np.float32):
    """The Problem of one suite entry (no bias: ResNet-style layers have none)."""
    n = layer["batch"] if batch is None else batch
    cin, cout, g = layer["in_channels"], layer["out_channels"], layer["groups"]
    x_shape = (n, cin, layer["height"], layer["width"])
    w_shape = (cout, cin // g, *layer["kernel_size"])
    problem, _ = make_problem(x_shape, dtype, w_shape, dtype, None, None, layer["stride"],
                              layer["padding"], layer["dilation"], g,
                              layer.get("padding_mode", "zeros"))
    return problem


def describe(p):
    """A short text of a problem's shape for tables: 8x64x56x56 k3x3 s1x1 -> 64."""
    (kh, kw), (sh, sw) = p.kernel_size, p.stride
    text = f"{p.batch}x{p.in_channels}x{p.height}x{p.width} k{kh}x{kw} s{sh}x{sw}"
    if p.dilation != (1, 1):
        text += f" d{p.dilation[0]}x{p.dilation[1]}"
    if p.groups != 1:
        text += f" g{p.groups}"
    return text + f" -> {p.out_channels}"


def geomean(values):
    """The geometric mean of the true values (None if there are none)."""
    values = [v for v in values if v]
    return float(np.exp(np.mean(np.log(values)))) if values else None
