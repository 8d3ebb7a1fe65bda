"""clconv.torch: autograd, nn.Conv2d subclass and model conversion, against torch itself."""
import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import clconv  # noqa: E402
import clconv.torch as ct  # noqa: E402

# (input shape (None as batch = unbatched), out channels, kernel, nn.Conv2d keyword arguments)
GRAD_CASES = {
    "plain": ((2, 3, 6, 6), 4, 3, {}),
    "stride2-pad1": ((2, 3, 7, 7), 4, 3, dict(stride=2, padding=1)),
    "pairs": ((2, 2, 7, 6), 3, (3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))),
    "same-dilated": ((2, 2, 7, 7), 3, 3, dict(padding="same", dilation=2)),
    "same-even": ((2, 2, 6, 5), 3, (2, 4), dict(padding="same")),
    "valid-no-bias": ((2, 2, 6, 6), 3, 2, dict(padding="valid", stride=2, bias=False)),
    "groups": ((2, 4, 5, 5), 6, 3, dict(groups=2, padding=1)),
    "depthwise": ((2, 4, 6, 6), 4, 3, dict(groups=4, padding=1, stride=2)),
    "depthwise-x3": ((2, 2, 5, 5), 6, 3, dict(groups=2, padding=1)),
    "pointwise": ((2, 4, 5, 5), 3, 1, dict(stride=2)),
    "reflect": ((2, 2, 6, 6), 3, 3, dict(padding=1, padding_mode="reflect")),
    "replicate": ((2, 2, 6, 5), 3, 3, dict(padding=(2, 1), padding_mode="replicate")),
    "circular": ((2, 2, 5, 6), 3, 3, dict(padding=(1, 2), padding_mode="circular", stride=2)),
    "reflect-same-groups": ((2, 4, 6, 6), 4, 3, dict(padding="same", padding_mode="reflect",
                                                      groups=2)),
    "circular-dilated-depthwise": ((2, 2, 7, 7), 4, 3, dict(padding=2, dilation=2, groups=2,
                                                            padding_mode="circular")),
    "unbatched": ((3, 6, 6), 4, 3, dict(padding=1, stride=2)),
    "unbatched-replicate-groups": ((4, 5, 5), 2, 3, dict(padding=1, groups=2,
                                                         padding_mode="replicate")),
}


def make_pair(input_shape, out_channels, kernel, kwargs, dtype, seed=0):
    """(torch nn.Conv2d, input) with random weights, deterministic."""
    torch.manual_seed(seed)
    channels = input_shape[-3]
    module = nn.Conv2d(channels, out_channels, kernel, dtype=dtype, **kwargs)
    x = torch.randn(input_shape, dtype=dtype, requires_grad=True)
    return module, x


def gradcheck(case, **kwargs):
    """torch.autograd.gradcheck of Conv2dFunction in float64 on GRAD_CASES[case]."""
    module, x = make_pair(*GRAD_CASES[case], torch.float64)
    geometry = (module.stride, module.padding, module.dilation, module.groups,
                module.padding_mode)
    return torch.autograd.gradcheck(
        lambda x, w, b: ct.Conv2dFunction.apply(x, w, b, *geometry),
        (x, module.weight, module.bias), **kwargs)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    # fast mode: random projections of the full Jacobians (every entry takes part)
    assert gradcheck(case, fast_mode=True)


@pytest.mark.parametrize("case", ["stride2-pad1", "depthwise-x3", "circular", "unbatched"])
def test_gradcheck_full_jacobian(case):
    assert gradcheck(case)


def test_only_requested_gradients(monkeypatch):
    module = ct.Conv2d.from_torch(make_pair(*GRAD_CASES["plain"], torch.float64)[0])
    module.weight.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)        # no gradient wanted either

    def refuse(*args, **kwargs):
        raise AssertionError("a gradient nobody asked for was computed")

    monkeypatch.setattr(ct.clconv, "conv2d_input_grad", refuse)
    monkeypatch.setattr(ct.clconv, "conv2d_weight_grad", refuse)
    module(x).sum().backward()
    assert module.bias.grad is not None and module.weight.grad is None


@pytest.mark.parametrize("case", ["pairs", "depthwise-x3", "reflect-same-groups", "unbatched"])
def test_float32_forward_backward_match_torch(case):
    reference, x = make_pair(*GRAD_CASES[case], torch.float32)
    module = ct.Conv2d.from_torch(reference)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = reference(x), module(x2)
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)


def test_float16_forward_backward():
    reference, _ = make_pair((2, 8, 9, 9), 16, 3, dict(padding=1, stride=2), torch.float32)
    module = ct.Conv2d.from_torch(reference).half()
    x = torch.randn(2, 8, 9, 9).half().requires_grad_(True)
    y = module(x)
    # the reference sees the same half-rounded operands, computed in float32
    x32, w32, b32 = (t.detach().float().requires_grad_(True) for t in
                     (x, module.weight, module.bias))
    expected = F.conv2d(x32, w32, b32, stride=2, padding=1)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), expected, rtol=2e-3, atol=2e-3)
    grad = torch.randn_like(expected).half()
    y.backward(grad)
    expected.backward(grad.float())
    for ours, theirs in [(x, x32), (module.weight, w32), (module.bias, b32)]:
        assert ours.grad.dtype == torch.float16
        # stored as half: within a few half ulps of the largest gradient
        torch.testing.assert_close(ours.grad.float(), theirs.grad, rtol=0,
                                   atol=2e-3 * theirs.grad.abs().max().item())


# --- ResNet-18, written here from torch.nn modules (no torchvision) ---------------------

class BasicBlock(nn.Module):
    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride,
                                                      bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(num_classes=10):
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    in_channels = 64
    for channels, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)]
        in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    reference = resnet18().double()
    converted = ct.convert(copy.deepcopy(reference))
    assert sum(type(m) is ct.Conv2d for m in converted.modules()) == 20
    assert not any(type(m) is nn.Conv2d for m in converted.modules())
    return reference, converted


def test_resnet18_eval_logits(resnets):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = resnets[0].eval()(x)
        logits = resnets[1].eval()(x)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


def test_resnet18_train_gradients(resnets):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = torch.tensor([3, 7])
    grads = []
    for model in resnets:
        model.train().zero_grad()
        F.cross_entropy(model(x), target).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-7, atol=1e-9, msg=name)


# --- convert, fusion, the module ------------------------------------------------------

def small_net():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.SiLU(),
        nn.Conv2d(8, 8, 1), nn.GELU(),
        nn.Conv2d(8, 8, 1), nn.GELU(approximate="tanh"),
        nn.Conv2d(8, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
    )


def test_convert_keeps_parameters_and_state():
    model = small_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    model.eval()
    graph = ct.convert(model)          # eval mode: the model in place, and a fused graph
    assert isinstance(graph, torch.fx.GraphModule) and graph is not model
    assert list(model.parameters()) == params          # the very same Parameter objects
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not model[0].training
    assert ct.convert(model.train()) is model           # train mode: in place only


def test_convert_fuses_in_sequential_only():
    reference = small_net()
    model = ct.convert(copy.deepcopy(reference))
    fused = [(i, m.activation) for i, m in enumerate(model) if isinstance(m, ct.Conv2d)]
    assert fused == [(0, "relu"), (2, "relu6"), (4, "silu"), (6, "gelu"), (8, None), (10, None)]
    for i in (1, 3, 5, 7, 12):
        assert type(model[i]) is nn.Identity
    assert type(model[9]) is nn.GELU
    # in training, a BatchNorm2d after a convolution takes the activation after it
    # (tests/test_batch_norm.py)
    assert type(model[11]) is ct.BatchNorm2d and model[11].activation == "relu"
    assert model[10]._batch_norm == (model[11],)
    assert "activation='relu'" in repr(model[0])
    x = torch.randn(2, 3, 10, 10)
    for mode in ("train", "eval"):
        getattr(reference, mode)(), getattr(model, mode)()
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
        with torch.no_grad():                           # the fused kernels
            torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_convert_without_fusion():
    model = ct.convert(small_net().eval(), fuse=False)
    assert all(m.activation is None for m in model if isinstance(m, ct.Conv2d))
    assert type(model[1]) is nn.ReLU


def test_no_fusion_outside_sequential():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x)) + self.conv(x)

    net = ct.convert(Net())       # train mode: no graph fusion either
    assert type(net.conv) is ct.Conv2d and net.conv.activation is None
    assert type(net.relu) is nn.ReLU


def test_convert_root_conv_and_nested():
    conv = nn.Conv2d(3, 4, 3)
    new = ct.convert(conv)
    assert type(new) is ct.Conv2d and new.weight is conv.weight and new.bias is conv.bias
    model = nn.ModuleDict({"a": nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))})
    ct.convert(model)
    assert model["a"][0][0].activation == "relu"


# --- the inference graph of convert: BatchNorm folding, fused residuals ---------------

def _randomise_batchnorms(model):
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    torch.manual_seed(11)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-1, 1)
    return model


def bottleneck_net():
    from _cases import load_example
    example = load_example("train_step")
    torch.manual_seed(10)
    return _randomise_batchnorms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        example.Bottleneck(8, 4, 2), example.Bottleneck(16, 4, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))).eval()


def called_modules(graph_module):
    """(module, kwargs) of every call_module node in order, a ConvChain's convolutions in its
    place (kwargs: {"residual": index} where a step takes one)."""
    calls = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        module = graph_module.get_submodule(node.target)
        if isinstance(module, ct.ConvChain):
            calls += [(conv, {} if r < 0 else {"residual": r})
                      for conv, (_, r) in zip(module.convs, module.steps)]
        else:
            calls.append((module, dict(node.kwargs)))
    return calls


def graph_calls(graph_module):
    """(module type name, kwargs) of every module called, in order (see called_modules)."""
    return [(type(module).__name__, kwargs) for module, kwargs in called_modules(graph_module)]


def test_eval_convert_folds_batchnorm_and_fuses_resnet_blocks():
    reference = bottleneck_net()
    model = copy.deepcopy(reference)
    x = torch.randn(2, 3, 16, 16)
    fused = ct.convert(model)
    calls = graph_calls(fused)
    assert [name for name, _ in calls] == ["Conv2d"] * 8 + ["AdaptiveAvgPool2d", "Flatten",
                                                             "Linear"]
    assert sum("residual" in kwargs for _, kwargs in calls) == 2     # both blocks' adds
    convs = [module for module, _ in called_modules(fused) if isinstance(module, ct.Conv2d)]
    # all eight run as one chain, their intermediate results kept on the device
    assert [n.target for n in fused.graph.nodes if n.op == "call_module"] == [
        "chain0", "5", "6", "7"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())   # folded away
    # every convolution but the downsample (the residual of the sum) ends in its ReLU
    assert [c.activation for c in convs] == ["relu"] * 3 + [None] + ["relu"] * 4
    assert all(c.bias is not None for c in convs)                    # the folded shifts
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
        # the model itself: converted in place, its BatchNorms and parameters untouched
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="folded BatchNorm.*train mode"):
        fused.train()
    assert not fused.eval().training


def test_eval_convert_without_folding_keeps_batchnorm_and_trains():
    reference = bottleneck_net()
    fused = ct.convert(copy.deepcopy(reference), fold_batchnorm=False)
    assert [name for name, _ in graph_calls(fused)].count("BatchNorm2d") == 8
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-5)
    fused.train()               # nothing folded: training stays exact
    reference.train()
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-5)


class FusionRules(nn.Module):
    """What may and may not be fused, each case once."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.e, self.f, self.g, self.shared = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.train_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        a = torch.add(x, self.a(x)).relu()                  # fused: residual first, method
        b = F.gelu(self.b(a), approximate="tanh")           # not fused: tanh gelu
        c = self.c(b)
        c = c + c.mean()                                    # not fused: c used twice
        d = torch.add(self.d(c), c, alpha=2)                # not fused: alpha
        e = F.silu(self.e(d) + d)                           # fused: residual and silu
        f = self.train_bn(self.f(e))                        # not folded: BatchNorm in train
        g = self.shared(f) + self.shared(e)                 # not fused: one module twice
        return F.relu6(self.g(g))                           # fused: function activation


def test_eval_convert_fuses_only_what_is_exact():
    torch.manual_seed(12)
    reference = FusionRules().eval()
    reference.train_bn.train()
    model = copy.deepcopy(reference)
    fused = ct.convert(model)
    fused.train_bn.train()      # train() on the graph is allowed: nothing was folded
    # in order: a b c d e f shared shared g (a-b and e-f run as chains)
    convs = [(m.activation, "residual" in kwargs) for m, kwargs in called_modules(fused)
             if isinstance(m, ct.Conv2d)]
    assert convs == [("relu", True), (None, False), (None, False), (None, False),
                     ("silu", True), (None, False), (None, False), (None, False),
                     ("relu6", False)]
    x = torch.randn(2, 4, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-5)


def test_untraceable_model_is_converted_in_place_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y          # data-dependent: fx cannot trace

    model = Branchy().eval()
    with pytest.warns(UserWarning, match="cannot trace Branchy"):
        assert ct.convert(model) is model
    assert type(model.conv) is ct.Conv2d and type(model.bn) is nn.BatchNorm2d


def test_activation_validation():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="activation.*gelu.*relu.*relu6.*silu"):
        ct.conv2d(x, w, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        ct.Conv2d(2, 3, 3, activation="sigmoid")


@pytest.mark.parametrize("activation", [None, "relu", "relu6", "silu", "gelu"])
def test_activation_and_residual_match_torch(activation):
    torch.manual_seed(4)
    operands = [torch.randn(2, 4, 8, 8), torch.randn(6, 2, 3, 3), torch.randn(6),
                torch.randn(2, 6, 4, 4)]
    kwargs = dict(stride=2, padding=1, groups=2)

    def reference(x, w, b, residual):
        y = F.conv2d(x, w, b, **kwargs) + residual
        return y if activation is None else ct.ACTIVATIONS[activation](y)

    expected = reference(*operands)
    # inference: one fused kernel
    y = ct.conv2d(*operands[:3], **kwargs, activation=activation, residual=operands[3])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    # autograd: the same value and the gradient of every operand
    leaves = [t.clone().requires_grad_(True) for t in operands]
    y = ct.conv2d(*leaves[:3], **kwargs, activation=activation, residual=leaves[3])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    reference_leaves = [t.clone().requires_grad_(True) for t in operands]
    grad = torch.randn_like(expected)
    y.backward(grad)
    reference(*reference_leaves).backward(grad)
    for leaf, reference_leaf in zip(leaves, reference_leaves):
        torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-4, atol=1e-4)

def test_module_loads_torch_checkpoint(tmp_path):
    torch.manual_seed(5)
    reference = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding="valid", groups=2,
                          padding_mode="replicate")
    torch.save(reference.state_dict(), tmp_path / "conv.pt")
    module = ct.Conv2d(4, 6, (3, 2), stride=(2, 1), padding="valid", groups=2,
                       padding_mode="replicate")
    module.load_state_dict(torch.load(tmp_path / "conv.pt"))
    assert module.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(3, 4, 9, 8)
    torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-6)


# --- torch operators: tracing, compiling, exporting -----------------------------------

def inference_pair():
    """(a torch model, its converted copy), in eval mode: fused activations, 'same' padding."""
    torch.manual_seed(6)
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(8, 4, 3, padding="same", padding_mode="reflect"),
                              nn.SiLU()).eval()
    return reference, ct.convert(copy.deepcopy(reference))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_jit_trace_follows_new_inputs():
    reference, model = inference_pair()
    x, other = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(other), reference(other), rtol=1e-4, atol=1e-5)
        # the traced operator takes any shape (the graph has no shape-dependent branch)
        bigger = torch.randn(1, 3, 11, 9)
        torch.testing.assert_close(traced(bigger), reference(bigger), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_torch_compile_without_graph_breaks(grad):
    reference, model = inference_pair()
    first = model.get_submodule("0")              # model: the fused GraphModule
    x = torch.randn(2, 3, 8, 8)
    residual = torch.randn(1, 8, 1, 1)            # broadcast: added by torch, in the graph
    with torch.set_grad_enabled(grad):
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        assert torch._dynamo.explain(ct.conv2d)(
            x, first.weight, first.bias, padding=1, residual=residual,
            activation="relu").graph_break_count == 0
        compiled = torch.compile(model, backend="aot_eager")
        other = torch.randn(2, 3, 8, 8, requires_grad=grad)
        y = compiled(other)
        other_reference = other.detach().clone().requires_grad_(grad)
        expected = reference(other_reference)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    if grad:
        y.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(other.grad, other_reference.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(first.weight.grad, reference[0].weight.grad,
                                   rtol=1e-4, atol=1e-4)


def test_torch_export():
    reference, model = inference_pair()
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
        assert "clconv.conv2d" in program.graph_module.code
        other = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(program.module()(other), reference(other),
                                   rtol=1e-4, atol=1e-5)


def test_operators_pass_opcheck():
    # schema, fake kernels (shapes and strides against the real ones), autograd registration
    torch.manual_seed(8)
    geometry = ct._geometry(1, "same", 1, 2, "reflect")
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b, residual = torch.randn(6, dtype=torch.float64), torch.randn(2, 6, 6, 6, dtype=torch.float64)
    dy = torch.randn(2, 6, 6, 6, dtype=torch.float64)
    ops = torch.ops.clconv
    for op, args in [
            (ops.conv2d, (x, w, b, residual, None, *geometry)),
            (ops.conv2d, (x.detach().to(memory_format=torch.channels_last), w.detach(), None,
                          None, "gelu", *geometry)),
            (ops.conv2d, (x.detach()[0], w.detach(), b, None, "relu",
                          *ct._geometry(2, 1, 1, 2, "zeros"))),
            (ops.conv2d_input_grad, ([2, 4, 6, 6], w.detach(), dy, *geometry)),
            (ops.conv2d_weight_grad, (x.detach(), [6, 2, 3, 2], dy, *geometry)),
            (ops.conv2d_bias_grad, (dy,))]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("operand", ["input", "weight", "bias"])
@pytest.mark.parametrize("kind", ["meta", "bfloat16", "int"])
def test_rejects_other_devices_and_dtypes(operand, kind):
    operands = dict(input=torch.randn(1, 2, 5, 5), weight=torch.randn(3, 2, 3, 3),
                    bias=torch.randn(3))
    operands[operand] = {"meta": lambda t: t.to("meta"), "bfloat16": lambda t: t.bfloat16(),
                         "int": lambda t: t.int()}[kind](operands[operand])
    with pytest.raises(TypeError, match=f"^{operand} must be"):
        ct.conv2d(*operands.values())
    with pytest.raises(TypeError, match=f"^{operand} must be"):   # checked before fusing
        ct.conv2d(*operands.values(), residual=torch.randn(1, 3, 1, 1))


# --- residual, memory format, double backward -----------------------------------------

RESIDUALS = {
    "exact": lambda: torch.randn(2, 4, 5, 5),
    "broadcast": lambda: torch.randn(1, 4, 1, 1),
    "float64": lambda: torch.randn(2, 4, 5, 5, dtype=torch.float64),
    "broadcast-float64": lambda: torch.randn(4, 1, 5, dtype=torch.float64),
    "scalar": lambda: 0.5,
}


@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("grad", [False, True])
def test_residual_follows_torch_addition(residual, grad):
    torch.manual_seed(9)
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
    residual = RESIDUALS[residual]()
    expected = F.silu(F.conv2d(x, w, b, padding=1) + residual)
    with torch.set_grad_enabled(grad):
        y = ct.conv2d(x.requires_grad_(grad), w, b, padding=1, activation="silu",
                      residual=residual)
    assert y.dtype == expected.dtype and y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_residual_fused_only_when_exact(monkeypatch):
    fused = []
    core = ct.clconv.conv2d

    def spy(*args, residual=None, **kwargs):
        fused.append(residual is not None)
        return core(*args, residual=residual, **kwargs)

    monkeypatch.setattr(ct.clconv, "conv2d", spy)
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    for name in RESIDUALS:
        ct.conv2d(x, w, padding=1, residual=RESIDUALS[name]())
    assert fused == [name == "exact" for name in RESIDUALS]


@pytest.mark.parametrize("layout", ["input", "weight", "both", "neither", "unbatched-weight",
                                    "depthwise-weight"])
def test_memory_format_follows_torch(layout):
    torch.manual_seed(10)
    depthwise = layout == "depthwise-weight"
    x = torch.randn((3, 6, 6) if layout.startswith("unbatched") else (2, 3, 6, 6),
                    dtype=torch.float64)
    w = torch.randn(3 if depthwise else 4, 1 if depthwise else 3, 3, 3, dtype=torch.float64)
    if layout in ("input", "both"):
        x = x.to(memory_format=torch.channels_last)
    if layout in ("weight", "both", "unbatched-weight", "depthwise-weight"):
        w = w.to(memory_format=torch.channels_last)
    groups = 3 if depthwise else 1
    results = []
    for conv in (F.conv2d, ct.conv2d):
        leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
                  for t in (x, w)]
        y = conv(*leaves, None, 2, 1, 1, groups)
        grads = torch.autograd.grad(y, leaves, torch.ones(y.shape, dtype=y.dtype))
        with torch.no_grad():
            unrecorded = conv(x, w, None, 2, 1, 1, groups)    # clconv: the eager fast path
        results.append([(t.stride(), t.is_contiguous(),
                         t.is_contiguous(memory_format=torch.channels_last))
                        for t in (y, *grads, unrecorded)])
    assert results[1] == results[0]


def test_double_backward_is_a_clear_error():
    module, x = make_pair(*GRAD_CASES["plain"], torch.float64)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.gradgradcheck(
            lambda x, w: ct.conv2d(x, w, stride=module.stride), (x, module.weight))


def test_fused_activation_has_no_gradient():
    x, w = torch.randn(1, 2, 5, 5, requires_grad=True), torch.randn(3, 2, 3, 3)
    with pytest.raises(RuntimeError, match="no gradient for a fused activation"):
        torch.ops.clconv.conv2d(x, w, None, None, "relu", *ct._geometry(1, 0, 1, 1, "zeros"))


def count_operator_calls(monkeypatch):
    """A list that grows by one per call through the clconv::conv2d operator."""
    calls, op = [], ct._conv2d_op

    def counted(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(ct, "_conv2d_op", counted)
    return calls


def test_eager_inference_runs_the_kernel_without_the_dispatcher(monkeypatch):
    calls = count_operator_calls(monkeypatch)
    torch.manual_seed(11)
    x, w, b = torch.randn(2, 3, 6, 6), nn.Parameter(torch.randn(4, 3, 3, 3)), torch.randn(4)
    residual = torch.randn(2, 4, 6, 6)
    expected = F.relu(F.conv2d(x, w, b, padding=1) + residual)
    with torch.no_grad():
        fast = ct.conv2d(x, w, b, padding=1, residual=residual, activation="relu")
        assert not calls
        by_operator = torch.ops.clconv.conv2d(x, w, b, residual, "relu",
                                              *ct._geometry(1, 1, 1, 1, "zeros"))
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(fast, by_operator)
    # grad enabled, nothing requires it: autograd records nothing either
    ct.conv2d(x, w.detach(), b, padding=1)
    assert not calls
    # w requires grad: autograd records the operator's own autograd.Function, no dispatch
    recorded = ct.conv2d(x, w, b, padding=1)
    assert not calls and type(recorded.grad_fn).__name__ == "_RecordedConv2dBackward"
    through_operator = torch.ops.clconv.conv2d(x, w, b, None, None,
                                               *ct._geometry(1, 1, 1, 1, "zeros"))
    grad = torch.randn_like(recorded)
    assert torch.equal(recorded, through_operator)
    assert torch.equal(torch.autograd.grad(recorded, w, grad)[0],
                       torch.autograd.grad(through_operator, w, grad)[0])


def test_eager_backward_runs_the_gradient_kernels_without_the_dispatcher(monkeypatch):
    calls = []
    for name in ("_input_grad_op", "_weight_grad_op", "_bias_grad_op"):
        op = getattr(ct, name)
        monkeypatch.setattr(ct, name, lambda *args, op=op: calls.append(1) or op(*args))
    backward_calls, real = [], clconv.conv2d_backward
    monkeypatch.setattr(clconv, "conv2d_backward",
                        lambda *args, **kwargs: backward_calls.append(kwargs["output_mask"])
                        or real(*args, **kwargs))
    module, x = make_pair(*GRAD_CASES["stride2-pad1"], torch.float32)
    converted = ct.convert(copy.deepcopy(module))
    leaves = x.detach().clone().requires_grad_(True)
    converted(leaves).square().sum().backward()
    module(x).square().sum().backward()
    assert not calls
    assert backward_calls == [(True, True, True)]     # one call (and one wait) for all three
    torch.testing.assert_close(leaves.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(converted.weight.grad, module.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(converted.bias.grad, module.bias.grad, rtol=1e-4, atol=1e-4)


class _Seen(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators dispatched under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_modes_profilers_and_tracing_still_see_the_operator(monkeypatch):
    calls = count_operator_calls(monkeypatch)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with torch.no_grad():
        with _Seen() as seen:
            ct.conv2d(x, w, padding=1)
        assert "clconv.conv2d.default" in seen.names
        with torch.profiler.profile() as profile:
            ct.conv2d(x, w, padding=1)
        assert "clconv::conv2d" in {e.key for e in profile.key_averages()}
        # a tensor subclass may dispatch on its own: it goes through the operator
        ct.conv2d(x.as_subclass(_Subclass), w, padding=1)
    with _Seen() as seen:                         # and so does a recorded call under a mode
        ct.conv2d(x, w.requires_grad_(), padding=1).sum().backward()
    assert "clconv.conv2d.default" in seen.names
    assert "clconv.conv2d_weight_grad.default" in seen.names
    assert len(calls) == 4


class _Subclass(torch.Tensor):
    pass
