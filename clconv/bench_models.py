"""`clconv bench --models`: whole torchvision models, converted by clconv.torch.convert,
against torch eager in the same process.

Per model and batch size: inference (eval mode, no_grad: the converted model is convert's
fused graph, BatchNorm folded, activations and residual additions in the convolutions'
epilogues, consecutive convolutions one ConvChain kept on the device) and a training step
(train mode: forward, cross-entropy, backward, SGD). The two models start from the same
weights; their calls alternate in rounds, so a noisy spell of a shared machine hits both,
and the best and the median of each are shown. The logits' relative difference
(max |clconv - torch| / max |torch|) checks that they computed the same thing. For the
training step the converted step's time is split into clconv's calls (wall clock, host
copies included; the convolutions and the training-mode BatchNorms convert pairs with
them) and the rest (torch's own operators).

Needs torch and torchvision (the `models` extra); the models are built untrained
(weights=None), so nothing is downloaded.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import clconv

MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny")
BATCHES = (1, 8)
SIZE = 224
TORCHVISION_HELP = (
    "--models needs torchvision, built for the installed torch: pip install 'clconv[models]' "
    "(on x86_64 Linux with Python 3.11 this machine's pip holds torch==2.14.1 with "
    "torchvision==0.29.1; PyPI's torchvision does not import beside other torch builds)")


def torchvision_models():
    """torchvision.models, or None where torchvision is missing or does not import."""
    try:
        import torchvision
    except Exception:       # noqa: BLE001 - a build for another torch fails in many ways
        return None
    return torchvision.models


def build(name):
    """An untrained torchvision model by name (ValueError for an unknown one)."""
    models = torchvision_models()
    if models is None:
        raise ValueError(TORCHVISION_HELP)
    if name not in models.list_models():
        raise ValueError(f"--models: torchvision has no model {name!r} (e.g. "
                         f"{', '.join(MODELS)})")
    return models.get_model(name, weights=None)


def parse_names(text):
    """The model names of a --models argument: comma-separated, or 'all'."""
    names = MODELS if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError(f"--models must name at least one model, got {text!r}")
    return names


@dataclass
class ModelRow:
    model: str
    mode: str               # "inference" | "training step"
    batch: int
    torch_ms: list
    clconv_ms: list
    difference: float       # max |clconv - torch| / max |torch| of the logits
    convolutions_ms: float | None = None    # training: clconv's calls in one step
    step_ms: float | None = None            # ... and that step's wall time

    @property
    def speedup(self):
        return min(self.torch_ms) / min(self.clconv_ms)


CALLS = ("conv2d", "conv2d_backward", "conv2d_input_grad", "conv2d_weight_grad",
         "conv2d_bias_grad", "conv2d_batch_norm", "conv2d_batch_norm_backward")


def clconv_breakdown(run):
    """(wall ms of run(), {clconv call: wall ms summed over the calls run() made})."""
    totals = defaultdict(float)
    saved = {name: getattr(clconv, name) for name in CALLS}

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += (time.perf_counter() - start) * 1e3
        return call
    for name, fn in saved.items():
        setattr(clconv, name, timed(name, fn))
    try:
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3, dict(totals)
    finally:
        for name, fn in saved.items():
            setattr(clconv, name, fn)


def alternating(runs, repeats):
    """{label: [wall ms of each call]} of the runs, called in turn repeats times each, after
    one warm-up call each (plans, kernel builds)."""
    for run in runs.values():
        run()
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            times[label].append((time.perf_counter() - start) * 1e3)
    return times


def relative_difference(ours, theirs):
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


def bench_inference(name, model, batch, size, repeats):
    import torch
    import clconv.torch as cltorch
    eager = model.eval()
    converted = cltorch.convert(copy.deepcopy(model).eval())
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = relative_difference(converted(x), eager(x))
        times = alternating({"torch": lambda: eager(x), "clconv": lambda: converted(x)},
                            repeats)
    return ModelRow(name, "inference", batch, times["torch"], times["clconv"], difference)


def train_step(model, optimizer, x, target):
    import torch
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, target).backward()
    optimizer.step()
    return logits.detach()


def bench_training(name, model, batch, size, repeats):
    import torch
    import clconv.torch as cltorch
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator)
    with torch.no_grad():
        classes = model.eval()(x[:1]).shape[1]
    eager = copy.deepcopy(model).train()
    converted = cltorch.convert(copy.deepcopy(model).train())
    target = torch.randint(0, classes, (batch,), generator=generator)
    steps = {}
    for label, m in (("torch", eager), ("clconv", converted)):
        optimizer = torch.optim.SGD(m.parameters(), lr=1e-3)
        steps[label] = (lambda m=m, o=optimizer: train_step(m, o, x, target))
    # The first steps, from the same weights and random state (dropout), give the same
    # logits.
    first = {}
    for label, run in steps.items():
        torch.manual_seed(2)
        first[label] = run()
    difference = relative_difference(first["clconv"], first["torch"])
    times = alternating(steps, repeats)
    step_ms, spent = clconv_breakdown(steps["clconv"])
    return ModelRow(name, "training step", batch, times["torch"], times["clconv"], difference,
                    sum(spent.values()), step_ms)


HEADER = (f"{'model':16s} {'batch':>5s} {'mode':14s} {'torch ms':>9s} {'median':>9s} "
          f"{'clconv ms':>9s} {'median':>9s} {'vs torch':>8s} {'logits diff':>11s} "
          f"{'convs ms':>9s} {'rest ms':>8s}")


def format_row(r):
    line = (f"{r.model:16s} {r.batch:5d} {r.mode:14s} {min(r.torch_ms):9.1f} "
            f"{statistics.median(r.torch_ms):9.1f} {min(r.clconv_ms):9.1f} "
            f"{statistics.median(r.clconv_ms):9.1f} {r.speedup:7.2f}x {r.difference:11.1e}")
    if r.convolutions_ms is not None:
        line += f" {r.convolutions_ms:9.1f} {r.step_ms - r.convolutions_ms:8.1f}"
    return line


THREAD_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def thread_note():
    """The OpenMP settings this run has, or the advice to set one (README: Threads)."""
    import os
    found = [f"{name}={os.environ[name]}" for name in THREAD_SETTINGS if name in os.environ]
    if found:
        return "OpenMP: " + ", ".join(found)
    return ("OpenMP: defaults (torch's idle threads spin for milliseconds after each "
            "operator, slowing the converted model's convolutions; GOMP_SPINCOUNT=10000 "
            "set before starting avoids it: README, Threads)")


def main(queue, names, batches=BATCHES, size=SIZE, repeats=5, train=True, out=sys.stdout):
    """Benchmark the named torchvision models; the rows."""
    if torchvision_models() is None:
        raise ValueError(TORCHVISION_HELP)
    import torch
    models = {name: build(name) for name in names}     # unknown names fail before any work
    info = clconv.device_info(queue.device)
    print(f"clconv bench --models: clconv on {info.name} ({info.platform}, driver "
          f"{info.driver_version}); torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; float32, {size} px, untrained weights; {repeats} alternating calls each, "
          "best and median; vs torch: best over best (> 1: clconv faster); convs ms: "
          "clconv's calls (convolutions, with their BatchNorms) in one converted training "
          "step, rest ms: the rest of it", file=out)
    print(thread_note(), file=out)
    print(HEADER, file=out, flush=True)
    rows = []
    torch.manual_seed(0)
    for name, model in models.items():
        for batch in batches:
            benches = [bench_inference] + [bench_training] * train
            for bench in benches:
                print(f"{name} batch {batch}: {bench.__name__[6:]} ...", file=sys.stderr,
                      flush=True)
                rows.append(bench(name, model, batch, size, repeats))
                print(format_row(rows[-1]), file=out, flush=True)
    return rows
