"""Train a small CNN on scikit-learn's 8x8 digits with every convolution run by clconv.

    python examples/train_digits.py                  # 10 epochs, clconv only
    python examples/train_digits.py --compare        # and the pure-torch twin, side by side
    python examples/train_digits.py --epochs 3 --limit 300 --compare

The model is built from torch.nn modules, then clconv.torch.convert swaps its nn.Conv2d for
clconv's (fusing each following ReLU into the convolution's kernel for inference). With
--compare, the torch twin starts from the same weights and sees the same batches, so the two
runs differ only by float32 rounding. The data set ships with scikit-learn: no download.
Exits nonzero when the loss does not fall or (with --compare) the final test accuracies
differ by more than one percentage point.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import clconv.torch


def load_data(limit, seed):
    """(x_train, y_train, x_test, y_test) as float32 images (N, 1, 8, 8) in [0, 1] and labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    return tuple(torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test))


def build_model():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),                    # 16 x 8 x 8
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),         # 32 x 4 x 4
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),        # depthwise
        nn.Conv2d(32, 32, 1), nn.ReLU(),                              # pointwise
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def train_epoch(model, optimiser, x, y, order, batch_size):
    """One pass over the training set in the given order; the mean loss."""
    model.train()
    total = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        optimiser.zero_grad()
        loss = F.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimiser.step()
        total += loss.item() * len(batch)
    return total / len(order)


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():           # inference: clconv's fused conv + ReLU kernels
        return (model(x).argmax(1) == y).float().mean().item()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=0,
                        help="use only this many training samples (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--compare", action="store_true",
                        help="also train the pure-torch twin and compare")
    return parser.parse_args(argv)


def main(argv=None):
    """Train; returns {"clconv": {"loss": [...], "accuracy": [...]}, "torch": ... (with
    --compare), "test_size": n, "problems": [what went wrong, if anything]}."""
    args = parse_args(argv)
    x_train, y_train, x_test, y_test = load_data(args.limit, args.seed)
    torch.manual_seed(args.seed)
    reference = build_model()
    models = {"clconv": clconv.torch.convert(copy.deepcopy(reference))}
    if args.compare:
        models["torch"] = reference
    optimisers = {name: torch.optim.Adam(m.parameters(), lr=args.lr)
                  for name, m in models.items()}
    results = {name: {"loss": [], "accuracy": []} for name in models}
    print(f"{len(x_train)} training and {len(x_test)} test digits; "
          f"device: {clconv.device_info(clconv.queue_for().device).name}")

    order_generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train), generator=order_generator)   # same for both
        line = [f"epoch {epoch:3d}"]
        for name, model in models.items():
            start = time.perf_counter()
            loss = train_epoch(model, optimisers[name], x_train, y_train, order,
                               args.batch_size)
            acc = accuracy(model, x_test, y_test)
            results[name]["loss"].append(loss)
            results[name]["accuracy"].append(acc)
            line.append(f"{name}: loss {loss:.4f}, test accuracy {acc:6.2%} "
                        f"({time.perf_counter() - start:.1f} s)")
        print("  |  ".join(line), flush=True)

    results["test_size"] = len(x_test)
    results["problems"] = check(results)
    for problem in results["problems"]:
        print("PROBLEM:", problem)
    return results


def check(results):
    """What is wrong with a run: a loss that did not fall, clconv and torch disagreeing."""
    problems = []
    losses = results["clconv"]["loss"]
    if len(losses) > 1 and not losses[-1] < losses[0]:
        problems.append(f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")
    if "torch" in results:
        a, b = results["clconv"]["accuracy"][-1], results["torch"]["accuracy"][-1]
        # float32 rounding differs, and training amplifies it a little over many epochs
        if abs(a - b) > 0.01:
            problems.append(f"clconv's accuracy {a:.2%} differs from torch's {b:.2%}")
    return problems


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
