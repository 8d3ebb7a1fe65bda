"""Train a CNN converted by clconv.torch.convert under DistributedDataParallel (gloo, 2
processes on 127.0.0.1), and check that it computes what one process does on the whole batch.

    python examples/train_ddp.py [--steps N] [--world-size 2]

Each rank builds the same model from the same seed, takes its slice of the same seeded
batches and runs SGD steps under DDP, which averages the gradients across the ranks after
each backward. With equal slices and a loss that is the mean over a slice, that average is
the gradient of the mean loss over the whole batch: the gradients of the first step and the
parameters after N steps equal a single process's on the full batches, up to float32
rounding. The model has no BatchNorm: under DDP each rank would normalise by its own
slice's statistics, which differ from the full batch's.

The ranks are started with the spawn method: OpenCL state does not survive fork, and clconv
refuses to run in a process forked after it used OpenCL (clconv.ForkedProcessError). Each
rank builds its own kernels (PyOpenCL caches the binaries on disk, so later runs are faster).
"""
from __future__ import annotations

import argparse
import os
import pickle
import socket
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import clconv.torch as cltorch


def make_model(seed=0):
    """A small CNN (no BatchNorm, see above) from seed, its convolutions run by clconv."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return cltorch.convert(model)


def batch(seed, n=4):
    """A deterministic batch: images (n, 3, 12, 12) and class labels (n,)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 12, 12, generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


def train(model, steps=1, lr=0.1, seed=0, n=4, part=slice(None)):
    """SGD steps on batch(seed + step, n)[part]: ({name: gradient of the first step},
    {name: parameter after the steps}), as NumPy arrays."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    first_grads = None
    for step in range(steps):
        x, target = batch(seed + step, n)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[part]), target[part]).backward()
        if first_grads is None:
            first_grads = {k: p.grad.numpy().copy() for k, p in inner.named_parameters()}
        optimizer.step()
    return first_grads, {k: p.detach().numpy().copy() for k, p in inner.named_parameters()}


def single_process(steps=1, lr=0.1, seed=0, n=4, part=slice(None)):
    """train() of make_model(seed) in this process, without DDP."""
    return train(make_model(seed), steps, lr, seed, n, part)


def _rank(rank, world_size, port, steps, lr, seed, n, out_dir):
    """One DDP process: train on its slice of each batch, leave train()'s result in a file."""
    torch.set_num_threads(1)            # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        per = n // world_size
        result = train(DistributedDataParallel(make_model(seed)), steps, lr, seed, n,
                       slice(rank * per, (rank + 1) * per))
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        # Tear down together: a rank that leaves while the other still talks to it can take
        # gloo's threads down with std::terminate (seen once under a loaded test run).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp(world_size=2, steps=1, lr=0.1, seed=0, n=4, timeout=600):
    """train() under DDP in world_size spawned processes: one (grads, params) per rank.

    A rank's exception is raised here with its traceback (ProcessRaisedException); ranks
    still running after timeout seconds are killed and TimeoutError is raised."""
    if n % world_size:
        raise ValueError(f"the batch ({n}) must split evenly over {world_size} ranks")
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_rank, nprocs=world_size, join=False,
                                     start_method="spawn",
                                     args=(world_size, free_port(), steps, lr, seed, n,
                                           out_dir))
        deadline = time.monotonic() + timeout
        try:
            # join() returns as soon as one rank ends; it raises if that rank failed.
            while not context.join(timeout=max(deadline - time.monotonic(), 0)):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the DDP ranks did not finish within {timeout} s")
        finally:
            for process in context.processes:       # none outlives a hang or an error
                if process.is_alive():
                    process.kill()
                    process.join()
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def max_difference(a, b):
    """The largest absolute difference between two {name: array} dicts."""
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args(argv)
    n = 2 * args.world_size
    # The single process first: its first convolution probes the device (once, cached on
    # disk), so the ranks find the probe's result instead of all probing at once.
    full_grads, full_params = single_process(args.steps, n=n)
    alone_grads, _ = single_process(1, n=n, part=slice(0, n // args.world_size))
    start = time.perf_counter()
    ranks = ddp(args.world_size, args.steps, n=n)
    print(f"DDP, {args.world_size} gloo ranks, {args.steps} SGD steps: "
          f"{time.perf_counter() - start:.1f} s (spawn, kernel builds included)")
    grads, params = ranks[0]
    print(f"  max |difference| to one process on the full batch: gradients "
          f"{max_difference(grads, full_grads):.2e}, parameters after {args.steps} steps "
          f"{max_difference(params, full_params):.2e}")
    print(f"  rank 0's gradients vs its slice alone (no all-reduce): "
          f"{max_difference(grads, alone_grads):.2e}")
    return ranks


if __name__ == "__main__":
    main()
