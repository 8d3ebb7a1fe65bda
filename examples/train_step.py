"""Time a training step (forward, backward, SGD) of ResNet-50 in torch eager and with every
convolution run by clconv (clconv.torch.convert), and say where the converted step's time
goes.

    python examples/train_step.py [--batch 2] [--size 128] [--rounds 5]

The two models start from the same weights and run in train mode. Their steps alternate in
rounds, so a noisy spell of a shared machine hits both; the best and median step of each
are printed. The breakdown sums the wall time of clconv's calls in one converted step (each
includes its host copies: torch tensors live in host memory) and of torch's own
convolutions (profiled) in one eager step. torchvision's resnet50 is used when it imports,
else the same architecture defined here (v1.5: the stride on the 3x3 convolution).
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

import clconv
import clconv.torch as cltorch
from clconv.bench_models import CALLS, alternating, clconv_breakdown


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50(classes=1000):
    try:
        import torchvision
        return torchvision.models.resnet50(weights=None, num_classes=classes)
    except Exception:       # not installed, or a build that does not match torch
        pass
    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                   nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cin, classes))


def step(model, optimizer, x, target):
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    return loss.item()


def torch_conv_ms(run):
    """The wall ms of torch's convolutions (forward and backward) in run(), profiled."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    names = {"aten::convolution": "forward", "aten::convolution_backward": "backward"}
    return {names[e.key]: e.cpu_time_total / 1e3 for e in prof.key_averages()
            if e.key in names}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = resnet50()
    converted = cltorch.convert(copy.deepcopy(eager), fuse=False)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 1000, (args.batch,))
    runs = {}
    for label, model in (("torch eager", eager), ("clconv", converted)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runs[label] = (lambda m=model, o=optimizer: step(m, o, x, target))
    times = alternating(runs, args.rounds)      # after a warm-up call each
    info = clconv.device_info(clconv.queue_for().device)
    print(f"ResNet-50 training step, batch {args.batch} at {args.size} px, float32; clconv on "
          f"{info.name} ({info.platform}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} interleaved rounds")
    for label, ms in times.items():
        print(f"  {label:12s} best {min(ms):8.1f} ms   median {statistics.median(ms):8.1f} ms")
    ratio = min(times["torch eager"]) / min(times["clconv"])
    print(f"  clconv vs torch eager (best steps): {ratio:.2f}x (> 1: clconv faster)")
    step_ms, spent = clconv_breakdown(runs["clconv"])
    print(f"  where one more converted step ({step_ms:.1f} ms) goes (wall ms; clconv's calls "
          "include their host copies):")
    for name in CALLS:
        print(f"    {name:20s} {spent.get(name, 0.0):8.1f}")
    print(f"    {'the rest (torch)':20s} {step_ms - sum(spent.values()):8.1f}")
    conv = torch_conv_ms(runs["torch eager"])
    print("  torch eager's own convolutions (profiled, wall ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(conv.items())))


if __name__ == "__main__":
    main()
