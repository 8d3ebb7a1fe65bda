"""clconv.torch.ConvChain: convert's inference graph runs consecutive convolutions as one
call on the device. It must compute exactly what the convolutions' own forwards compute
(bit for bit), fall back to them wherever it could differ, and keep every buffer alive
while kernels use it."""
import copy
import pickle
import re
import threading

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import clconv.torch as ct  # noqa: E402
from clconv import arrays, functional  # noqa: E402
from test_torch_backend import bottleneck_net  # noqa: E402


class Chained(nn.Module):
    """Three convolutions in a row (the last with a residual from outside the chain): the
    converted graph's output is the chain's output."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, dtype=dtype)
        self.b = nn.Conv2d(6, 6, 3, padding=1, groups=3, padding_mode="reflect", dtype=dtype)
        self.c = nn.Conv2d(6, 4, 1, bias=False, dtype=dtype)

    def forward(self, x, r):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))) + r


def chained(dtype=torch.float32):
    torch.manual_seed(20)
    reference = Chained(dtype).eval()
    fused = ct.convert(copy.deepcopy(reference))
    assert [n.target for n in fused.graph.nodes if n.op == "call_module"] == ["chain0"]
    return reference, fused


class Calls:
    """Counts the chain's device runs and clconv.torch's per-operator kernel calls."""

    def __init__(self, monkeypatch):
        self.device_runs = self.per_op = 0
        run, kernel = ct.ConvChain._run, ct._conv2d_kernel

        def counted_run(chain, *args):
            self.device_runs += 1
            return run(chain, *args)

        def counted_kernel(*args):
            self.per_op += 1
            return kernel(*args)
        monkeypatch.setattr(ct.ConvChain, "_run", counted_run)
        monkeypatch.setattr(ct, "_conv2d_kernel", counted_kernel)


def per_op(fused, *inputs):
    """The graph's result with every convolution's own forward (a hook turns the chain off)."""
    handle = fused.chain0.convs[0].register_forward_hook(lambda *args: None)
    try:
        return fused(*inputs)
    finally:
        handle.remove()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_chain_runs_on_the_device_and_equals_the_convolutions_bit_for_bit(monkeypatch, dtype):
    reference, fused = chained(dtype)
    x, r = torch.randn(2, 3, 9, 7, dtype=dtype), torch.randn(2, 4, 9, 7, dtype=dtype)
    calls = Calls(monkeypatch)
    waits = []
    to_host = arrays.to_host
    monkeypatch.setattr(arrays, "to_host", lambda *a: waits.append(1) or to_host(*a))
    with torch.no_grad():
        y = fused(x, r)
        assert (calls.device_runs, calls.per_op, len(waits)) == (1, 0, 1)
        expected = per_op(fused, x, r)
        assert calls.per_op == 3
        assert torch.equal(y, expected)
        assert y.is_contiguous() and y.dtype == dtype
        if dtype != torch.float16:      # torch's CPU half convolution is not the oracle
            torch.testing.assert_close(y, reference(x, r), rtol=1e-4, atol=1e-5)
        # unbatched: the same chain
        assert torch.equal(fused(x[0], r[0]), per_op(fused, x[0], r[0]))
    with torch.inference_mode():
        assert torch.equal(fused(x.clone(), r), y)      # inference tensors in and out
    assert calls.device_runs == 3


def test_chain_on_a_device_with_its_own_memory(monkeypatch):
    # What a GPU runs: inputs and weights uploaded through staging, results read back.
    monkeypatch.setattr(arrays, "shares_host_memory", lambda queue: False)
    reference, fused = chained()
    calls = Calls(monkeypatch)
    x, r = torch.randn(2, 3, 9, 7), torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        y = fused(x, r)
        assert calls.device_runs == 1
        assert torch.equal(y, per_op(fused, x, r))
        torch.testing.assert_close(y, reference(x, r), rtol=1e-4, atol=1e-5)


def test_mobilenet_like_graph_is_one_chain_with_the_same_result():
    reference = bottleneck_net()
    fused = ct.convert(copy.deepcopy(reference))
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(fused(x), per_op(fused, x))
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-5)


def test_chain_reuses_its_intermediate_buffers(monkeypatch):
    reference = bottleneck_net()
    fused = ct.convert(copy.deepcopy(reference))
    made, new_buffer = [], ct.ConvChain._new_buffer
    monkeypatch.setattr(ct.ConvChain, "_new_buffer",
                        staticmethod(lambda queue, nbytes: made.append(nbytes)
                                     or new_buffer(queue, nbytes)))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        first = fused(x)
        intermediates = len(fused.chain0.convs) - len(fused.chain0.outputs)
        assert 0 < len(made) < intermediates      # reused within the call
        count = len(made)
        for _ in range(3):
            assert torch.equal(fused(x), first)
        assert len(made) == count                 # and by the next calls
        other = torch.randn(1, 3, 12, 12)         # another shape: other buffers, same values
        assert torch.equal(fused(other), per_op(fused, other))
        torch.testing.assert_close(fused(other), reference(other), rtol=1e-4, atol=1e-5)


def test_chain_with_several_outputs():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            a = self.a(x)
            b = self.b(a)
            return b, a.mean()       # a is used after the chain too

    torch.manual_seed(21)
    reference = TwoOut().eval()
    fused = ct.convert(copy.deepcopy(reference))
    assert fused.chain0.outputs == (1, 2)
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        for y, expected in zip(fused(x), reference(x)):
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_unused_convolutions_are_left_as_traced():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            self.b(self.a(x))        # traced, never used
            return x * 2

    fused = ct.convert(Dead().eval())
    assert not any(isinstance(m, ct.ConvChain) for m in fused.modules())
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        assert torch.equal(fused(x), x * 2)


@pytest.mark.parametrize("case", ["recording", "hook", "channels_last", "broadcast_residual",
                                  "strided_input"])
def test_chain_falls_back_to_the_convolutions_where_it_could_differ(monkeypatch, case):
    reference, fused = chained()
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    hooked = []
    if case == "hook":
        fused.chain0.convs[1].register_forward_hook(lambda *args: hooked.append(1))
    if case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if case == "broadcast_residual":
        r = torch.randn(1, 4, 1, 8)
    if case == "strided_input":
        x = torch.randn(2, 3, 8, 16)[..., ::2]
    calls = Calls(monkeypatch)
    with torch.set_grad_enabled(case == "recording"):
        y = fused(x, r)
        expected = reference(x, r)
    assert calls.device_runs == 0 and calls.per_op == 3
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == (case == "channels_last")
    if case == "hook":
        assert hooked == [1]
    if case == "recording":     # autograd sees the convolutions
        y.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(fused.chain0.convs[0].weight.grad, reference.a.weight.grad,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", ["channels", "dtype", "residual_shape"])
def test_bad_input_fails_as_the_convolutions_fail(bad):
    reference, fused = chained()
    x, r = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
    if bad == "channels":
        x = torch.randn(1, 5, 8, 8)
    if bad == "dtype":
        x = x.double()
    if bad == "residual_shape":
        r = torch.randn(1, 4, 3, 8)          # not broadcastable
    with torch.no_grad():
        with pytest.raises((TypeError, ValueError, RuntimeError)) as expected:
            per_op(fused, x, r)
        with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
            fused(x, r)
        # nothing was corrupted
        good = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(fused(*good), reference(*good), rtol=1e-4, atol=1e-5)


def test_chain_follows_weight_changes():
    reference, fused = chained()
    x, r = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
    convs = fused.chain0.convs
    with torch.no_grad():
        fused(x, r)
        convs[0].weight.mul_(2)                          # in place: a new version
        reference.a.weight.mul_(2)
        torch.testing.assert_close(fused(x, r), reference(x, r), rtol=1e-4, atol=1e-5)
        convs[2].weight.data = torch.randn(4, 6, 1, 1)   # new memory
        reference.c.weight.data = convs[2].weight.data.clone()
        torch.testing.assert_close(fused(x, r), reference(x, r), rtol=1e-4, atol=1e-5)
        fused.double()                                   # every parameter replaced
        with pytest.raises(TypeError, match="dtype"):    # checked against the new ones
            fused(x, r)
        y = fused(x.double(), r.double())
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, reference.double()(x.double(), r.double()),
                                   rtol=1e-6, atol=1e-8)


def test_chained_graph_copies_and_pickles():
    reference, fused = chained()
    x, r = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = fused(x, r)                 # its device state exists now
        for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert other.chain0._params == {}
            assert torch.equal(other(x, r), expected)
        assert torch.equal(fused(x, r), expected)


def test_a_failure_in_the_chain_leaves_it_working(monkeypatch):
    reference, fused = chained()
    x, r = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
    enqueue, count = functional.enqueue, []

    def failing(*args, **kwargs):
        count.append(1)
        if len(count) == 2:
            raise RuntimeError("injected launch failure")
        return enqueue(*args, **kwargs)
    monkeypatch.setattr(functional, "enqueue", failing)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="injected"):
            fused(x, r)
        torch.testing.assert_close(fused(x, r), reference(x, r), rtol=1e-4, atol=1e-5)


def test_chain_under_load_from_threads_with_temporary_inputs():
    # Inputs are read in place and dropped by the caller as soon as the call returns; the
    # intermediate buffers are released while later kernels still run: every result must
    # still be exact.
    reference, fused = chained()
    errors = []

    def work(seed):
        generator = torch.Generator().manual_seed(seed)
        try:
            for _ in range(15):
                shape = (int(torch.randint(1, 4, (1,), generator=generator)), 3, 12, 10)
                x = torch.randn(shape, generator=generator)
                r = torch.randn(shape[0], 4, 12, 10, generator=generator)
                with torch.no_grad():
                    y = fused(x.clone(), r.clone())     # the clones die at once
                    torch.testing.assert_close(y, reference(x, r), rtol=1e-4, atol=1e-5)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
