"""A convolution with training-mode BatchNorm2d and an activation on the device
(clconv.conv2d_batch_norm and its backward), and convert's use of it in training: against
the NumPy reference and torch itself."""
import copy
import pickle

import numpy as np
import pytest

import clconv
from reference import (batch_norm_train_grad_ref, batch_norm_train_ref, conv2d_bias_grad_ref,
                       conv2d_input_grad_ref, conv2d_reference, conv2d_weight_grad_ref)

ACTIVATIONS = (None, "relu", "relu6", "silu", "gelu")
TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}

# (input shape, weight shape, bias?, geometry (stride, padding, dilation, groups, mode))
CASES = {
    "3x3": ((2, 3, 9, 8), (5, 3, 3, 3), True, (1, 1, 1, 1, "zeros")),
    "depthwise-stride2": ((2, 4, 9, 9), (8, 1, 3, 3), False, (2, 1, 1, 4, "reflect")),
    "pointwise-batch1": ((1, 6, 5, 7), (4, 6, 1, 1), False, (1, 0, 1, 1, "zeros")),
    "many-channels": ((1, 40, 4, 4), (40, 1, 3, 3), True, (1, 1, 1, 40, "zeros")),
}


def make(case, dtype, rng, affine=True, running=True):
    x_shape, w_shape, has_bias, geometry = CASES[case]
    c = w_shape[0]
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(c).astype(dtype) if has_bias else None
    gamma = rng.standard_normal(c).astype(dtype) if affine else None
    beta = rng.standard_normal(c).astype(dtype) if affine else None
    rm = rng.standard_normal(c).astype(dtype) if running else None
    rv = (rng.random(c) + 0.5).astype(dtype) if running else None
    return x, w, b, gamma, beta, rm, rv, geometry


def dtypes(has_fp64):
    return [np.float32] + [np.float64] * has_fp64


# Every activation and parameter kind on one case; the other geometries with one of each.
MATRIX = ([("3x3", a, affine, running) for a in ACTIVATIONS
           for affine, running in [(True, True), (False, False), (True, False)]]
          + [(case, a, affine, affine) for case in list(CASES)[1:]
             for a, affine in [("relu6", True), (None, False)]])


@pytest.mark.parametrize("case,activation,affine,running", MATRIX)
def test_forward_and_backward_match_reference(case, activation, affine, running, rng,
                                              has_fp64):
    for dtype in dtypes(has_fp64):
        x, w, b, gamma, beta, rm, rv, geometry = make(case, dtype, rng, affine, running)
        rm0, rv0 = (None, None) if rm is None else (rm.copy(), rv.copy())
        z, y, mean, invstd = clconv.conv2d_batch_norm(
            x, w, b, gamma, beta, rm, rv, *geometry, momentum=0.3, eps=1e-3,
            activation=activation)
        y_ref = conv2d_reference(x, w, b, *geometry)
        z_ref, mean_ref, invstd_ref, rm_ref, rv_ref = batch_norm_train_ref(
            y, gamma, beta, rm0, rv0, 0.3, 1e-3, activation)
        tol = TOL[dtype]
        assert z.dtype == y.dtype == mean.dtype == invstd.dtype == dtype
        np.testing.assert_allclose(y, y_ref, **tol)
        np.testing.assert_allclose(z, z_ref, **tol)
        np.testing.assert_allclose(mean, mean_ref, **tol)
        np.testing.assert_allclose(invstd, invstd_ref, **tol)
        if running:
            np.testing.assert_allclose(rm, rm_ref, **tol)
            np.testing.assert_allclose(rv, rv_ref, **tol)

        dz = rng.standard_normal(z.shape).astype(dtype)
        grads = clconv.conv2d_batch_norm_backward(x, w, y, mean, invstd, gamma, beta, dz,
                                                  *geometry, activation=activation)
        dy_ref, dgamma_ref, dbeta_ref = batch_norm_train_grad_ref(y, gamma, beta, dz, 1e-3,
                                                                  activation)
        expected = [conv2d_input_grad_ref(x.shape, w, dy_ref, *geometry),
                    conv2d_weight_grad_ref(x, w.shape, dy_ref, *geometry),
                    conv2d_bias_grad_ref(dy_ref)]
        expected += [dgamma_ref, dbeta_ref] if affine else [None, None]
        for i, (got, want) in enumerate(zip(grads, expected)):
            if want is None:
                assert got is None
                continue
            assert got.dtype == dtype and got.shape == want.shape
            # The bias gradient is a sum that cancels (zero but for rounding): its error
            # is relative to the sum of the terms' sizes.
            bound = (np.abs(dy_ref).sum(axis=(0, 2, 3)).max() if i == 2
                     else np.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=tol["rtol"],
                                       atol=tol["atol"] + tol["rtol"] * bound)


def test_output_mask_leaves_out_gradients(rng):
    x, w, b, gamma, beta, rm, rv, geometry = make("3x3", np.float32, rng)
    z, y, mean, invstd = clconv.conv2d_batch_norm(x, w, b, gamma, beta, rm, rv, *geometry)
    dz = rng.standard_normal(z.shape).astype(np.float32)
    full = clconv.conv2d_batch_norm_backward(x, w, y, mean, invstd, gamma, beta, dz, *geometry)
    for mask in [(True, False, False, False, True), (False, True, True, True, False),
                 (False,) * 5]:
        part = clconv.conv2d_batch_norm_backward(x, w, y, mean, invstd, gamma, beta, dz,
                                                 *geometry, output_mask=mask)
        for got, whole, wanted in zip(part, full, mask):
            if wanted:
                np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-7)
            else:
                assert got is None


def test_activation_gradient_is_torchs_at_the_boundaries():
    """relu and relu6 pass no gradient where their input is exactly 0 or 6 (torch's
    threshold_backward and hardtanh_backward): the backward sees the input as the forward
    computed it."""
    # -1, 1, -1, 1 normalise to exactly themselves (mean 0, variance 1, eps 0): the
    # activation's input is y * gamma + beta.
    y = np.array([-1.0, 1.0, -1.0, 1.0]).reshape(1, 1, 2, 2)
    w = np.ones((1, 1, 1, 1))
    for activation, gamma, beta, passing in (("relu", 1.0, 1.0, 2), ("relu6", 3.0, 3.0, 0),
                                             ("relu6", 2.5, 3.0, 4)):
        params = np.array([gamma]), np.array([beta])
        z, out, mean, invstd = clconv.conv2d_batch_norm(y, w, None, *params, None, None,
                                                        eps=0.0, activation=activation)
        assert invstd[0] == 1.0
        dbeta = clconv.conv2d_batch_norm_backward(y, w, out, mean, invstd, *params,
                                                  np.ones_like(z), activation=activation)[4]
        assert dbeta[0] == passing, (activation, z.ravel())


def test_calls_from_eight_threads_share_kernels_and_scratch_safely(queue):
    """Forward and backward calls on one queue from eight threads at once, two shapes that
    share their kernels (the batch differs) and the backward's dy scratch."""
    from concurrent.futures import ThreadPoolExecutor
    w = np.random.default_rng(0).standard_normal((6, 4, 3, 3)).astype(np.float32)
    gamma, beta = np.linspace(0.5, 1.5, 6, dtype=np.float32), np.zeros(6, np.float32)

    def call(seed):
        r = np.random.default_rng(seed)
        x = r.standard_normal((1 + seed % 2, 4, 7, 9)).astype(np.float32)
        z, y, mean, invstd = clconv.conv2d_batch_norm(x, w, None, gamma, beta, None, None,
                                                      padding=1, activation="relu",
                                                      queue=queue)
        dz = r.standard_normal(z.shape).astype(np.float32)
        grads = clconv.conv2d_batch_norm_backward(x, w, y, mean, invstd, gamma, beta, dz,
                                                  padding=1, activation="relu", queue=queue)
        return x, dz, z, grads

    with ThreadPoolExecutor(8) as pool:
        for x, dz, z, (dx, dw, _, dgamma, dbeta) in pool.map(call, range(24)):
            y = conv2d_reference(x, w, None, 1, 1)
            z_ref = batch_norm_train_ref(y, gamma, beta, None, None, 0, 1e-5, "relu")[0]
            dy, dgamma_ref, dbeta_ref = batch_norm_train_grad_ref(y, gamma, beta, dz, 1e-5,
                                                                  "relu")
            for got, want in ((z, z_ref), (dx, conv2d_input_grad_ref(x.shape, w, dy, 1, 1)),
                              (dw, conv2d_weight_grad_ref(x, w.shape, dy, 1, 1)),
                              (dgamma, dgamma_ref), (dbeta, dbeta_ref)):
                np.testing.assert_allclose(got, want, rtol=2e-4,
                                           atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("call,message", [
    (dict(input=np.zeros((3, 5, 5), np.float32)), "input must be 4-D"),
    (dict(input=np.zeros((1, 3, 1, 1), np.float32), weight=np.zeros((2, 3, 1, 1), np.float32)),
     "more than 1 value per channel"),
    (dict(input=np.zeros((2, 3, 5, 5), np.float16), weight=np.zeros((2, 3, 3, 3), np.float16)),
     "float32 or float64"),
    (dict(bn_weight=None), "both be arrays or both None"),
    (dict(running_var=np.ones(3, np.float32)), "running_var must have shape"),
    (dict(running_mean=np.zeros(4, np.float32)[::2]), "C-contiguous, writable"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(momentum="0.1"), "momentum must be a number"),
    (dict(stride=0), "stride"),
])
def test_forward_rejects_before_device_work(call, message, no_device_work):
    args = dict(input=np.zeros((2, 3, 5, 5), np.float32), weight=np.zeros((2, 3, 3, 3),
                                                                         np.float32),
                bias=None, bn_weight=np.ones(2, np.float32), bn_bias=np.zeros(2, np.float32),
                running_mean=np.zeros(2, np.float32), running_var=np.ones(2, np.float32))
    args.update(call)
    error = TypeError if "float32 or" in message or "number" in message else ValueError
    with pytest.raises(error, match=message):
        clconv.conv2d_batch_norm(**args)


def test_backward_rejects_before_device_work(no_device_work):
    x, w = np.zeros((2, 3, 5, 5), np.float32), np.zeros((2, 3, 3, 3), np.float32)
    y, dz = np.zeros((2, 2, 3, 3), np.float32), np.zeros((2, 2, 3, 3), np.float32)
    stats = np.zeros(2, np.float32), np.ones(2, np.float32)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        clconv.conv2d_batch_norm_backward(x, w, y, *stats, None, None, dz[:1])
    with pytest.raises(ValueError, match="mean must have shape"):
        clconv.conv2d_batch_norm_backward(x, w, y, stats[0][:1], stats[1], None, None, dz)
    with pytest.raises(TypeError, match="output_mask must be five bools"):
        clconv.conv2d_batch_norm_backward(x, w, y, *stats, None, None, dz,
                                          output_mask=(True, True, True))


# --- clconv.torch: convert in training mode -----------------------------------------------

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import clconv.torch as ct  # noqa: E402


def block_model(dtype=torch.float32, cumulative=True):
    """Conv-BatchNorm-activation blocks as torchvision builds them, and one of each kind
    that convert leaves alone (a BatchNorm after a non-Sequential use, no activation)."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.BatchNorm2d(8, momentum=None if cumulative else 0.2), nn.ReLU(),
        nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6, affine=False),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False),
        nn.SiLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).to(dtype)


def train_steps(model, x, steps=2, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    outputs = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(x)
        out.square().sum().backward()
        optimizer.step()
        outputs.append(out.detach())
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converted_training_equals_torch(dtype, has_fp64):
    if dtype == torch.float64 and not has_fp64:
        pytest.skip("the device has no float64")
    reference = block_model(dtype).train()
    model = ct.convert(copy.deepcopy(reference))
    fused = [m for m in model if isinstance(m, ct.BatchNorm2d)]
    assert len(fused) == 4 and [m.activation for m in fused] == ["relu6", "relu", None, "silu"]
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for got, want in zip(train_steps(model, x), train_steps(reference, x)):
        torch.testing.assert_close(got, want, **tol)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, **tol, msg=name)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **tol)


def test_fused_forward_is_one_clconv_call_each_way(monkeypatch):
    model = ct.convert(block_model().train())
    calls = []
    for name in ("conv2d", "conv2d_batch_norm", "conv2d_batch_norm_backward",
                 "conv2d_backward"):
        original = getattr(clconv, name)
        monkeypatch.setattr(clconv, name, lambda *a, _f=original, _n=name, **k:
                            calls.append(_n) or _f(*a, **k))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert calls.count("conv2d_batch_norm") == 4 and calls.count("conv2d") == 0
    assert calls.count("conv2d_batch_norm_backward") == 4
    assert calls.count("conv2d_backward") == 0


def test_unfused_paths_keep_torch_semantics():
    """Eval mode, hooks, frozen parameters, an input the convolution did not produce and
    an observed call (torch's profiler) all give torch's results."""
    reference = block_model().train()
    model = ct.convert(copy.deepcopy(reference))
    x = torch.randn(2, 3, 8, 8)
    seen = []
    hook = model[1].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen[0], reference[0](x), rtol=1e-4, atol=1e-5)
    hook.remove()
    # the BatchNorm module alone is torch's, then its activation
    y = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(model[1](y), nn.functional.relu6(reference[1](y)), rtol=1e-5,
                               atol=1e-6)
    with torch.profiler.profile():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    for m in (model, reference):
        for p in m[:3].parameters():
            p.requires_grad_(False)
    for got, want in zip(train_steps(model, x), train_steps(reference, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_copies_and_pickles_keep_the_fusion():
    model = ct.convert(block_model().train())
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other[0]._batch_norm[0] is other[1]
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(other(x), copy.deepcopy(model)(x), rtol=1e-5, atol=1e-6)


def test_eval_conversion_of_a_train_converted_model_folds_its_batchnorms():
    model = ct.convert(block_model().train())
    train_steps(model, torch.randn(2, 3, 8, 8))
    reference = copy.deepcopy(model).eval()
    graph = ct.convert(model.eval())
    assert not any(isinstance(m, nn.BatchNorm2d) and m.track_running_stats
                   for m in graph.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), reference(x), rtol=1e-4, atol=1e-5)


def test_compiled_training_model_has_no_graph_breaks():
    # (torch's own BatchNorm2d(momentum=None) breaks it, on num_batches_tracked.item())
    reference = block_model(cumulative=False).train()
    model = ct.convert(copy.deepcopy(reference))
    x = torch.randn(2, 3, 8, 8)
    assert torch._dynamo.explain(copy.deepcopy(model))(x).graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager")
    got, want = compiled(x), reference(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got.sum().backward(), want.sum().backward()
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad, rtol=1e-4,
                               atol=1e-4)


def test_double_backward_is_an_error():
    model = ct.convert(block_model().train())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = model[:3](x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


class Block(nn.Module):
    """A ResNet-style block: conv1-bn1-act1 (an activation module of its own, fused),
    conv2-bn2 whose sum with the input goes through the shared relu (not fused), a
    convolution whose output is used twice and a BatchNorm called twice (neither paired)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.act1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv4, self.shared = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.relu(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x)
        y = self.conv3(out)
        out = self.relu(self.bn3(y) + y)
        return self.shared(self.conv4(out)) + self.shared(out)


def test_traced_models_pair_their_batchnorms_outside_sequentials():
    torch.manual_seed(5)
    reference = Block().train()
    model = ct.convert(copy.deepcopy(reference))
    assert model.conv1._batch_norm == (model.bn1,) and model.bn1.activation == "relu"
    assert type(model.act1) is nn.Identity
    assert model.conv2._batch_norm == (model.bn2,) and model.bn2.activation is None
    assert type(model.relu) is nn.ReLU
    for name in ("conv3", "conv4"):
        assert model.get_submodule(name)._batch_norm == ()
    assert type(model.bn3) is type(model.shared) is nn.BatchNorm2d
    x = torch.randn(2, 4, 6, 6)
    for got, want in zip(train_steps(model, x, lr=1e-3), train_steps(reference, x, lr=1e-3)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
