"""examples/train_step.py: its ResNet-50 is torchvision's architecture, and its timing helpers
report a converted step's clconv calls (on one bottleneck block, to keep the builds few)."""
import copy
import os
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cases import load_example  # noqa: E402


def test_resnet50_has_torchvisions_parameters():
    model = load_example("train_step").resnet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032     # torchvision's
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 53


def test_a_converted_step_matches_torch_and_is_broken_down():
    import clconv.torch as cltorch
    example = load_example("train_step")
    torch.manual_seed(0)
    block = torch.nn.Sequential(example.Bottleneck(8, 4, 2), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(16, 10))
    converted = cltorch.convert(copy.deepcopy(block), fuse=False)
    x, target = torch.randn(2, 8, 9, 9), torch.tensor([1, 7])
    losses = []
    for model in (block, converted):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses.append(example.step(model, optimizer, x, target))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for a, b in zip(block.parameters(), converted.parameters()):    # one SGD step apart
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    ms, spent = example.clconv_breakdown(lambda: example.step(converted, optimizer, x, target))
    assert ms > 0 and set(spent) == {"conv2d", "conv2d_backward"}
    assert sum(spent.values()) <= ms
    import clconv
    assert clconv.conv2d.__name__ == "conv2d"       # the timers are taken off again
