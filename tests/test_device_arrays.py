"""pyopencl arrays in, pyopencl arrays out, on the same queue; strided and offset views."""
import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

import clconv
from reference import conv2d_reference


def close(y, ref, dtype=np.float32):
    scale = max(1.0, float(np.abs(ref).max()))
    return np.abs(np.asarray(y, np.float64) - ref).max() <= 1e-5 * scale * 10


def test_device_input_gives_device_output_on_the_same_queue(queue, rng):
    x = rng.standard_normal((2, 3, 9, 10)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    xd = cl_array.to_device(queue, x)
    y = clconv.conv2d(xd, cl_array.to_device(queue, w), cl_array.to_device(queue, b),
                      padding=1)
    assert isinstance(y, cl_array.Array)
    assert y.queue is queue and y.shape == (2, 4, 9, 10) and y.dtype == np.float32
    assert close(y.get(), conv2d_reference(x, w, b, padding=1))


def test_device_input_with_host_weight(queue, rng):
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    y = clconv.conv2d(cl_array.to_device(queue, x), w, stride=2)
    assert isinstance(y, cl_array.Array)
    assert close(y.get(), conv2d_reference(x, w, stride=2))


def test_unbatched_device_input(queue, rng):
    x = rng.standard_normal((3, 7, 9)).astype(np.float32)
    w = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    y = clconv.conv2d(cl_array.to_device(queue, x), cl_array.to_device(queue, w))
    assert y.shape == (5, 6, 8)
    assert close(y.get(), conv2d_reference(x, w))


@pytest.mark.parametrize("view", ["transposed", "sliced", "offset"])
def test_non_contiguous_and_offset_device_views(queue, rng, view):
    base = rng.standard_normal((2, 4, 12, 14)).astype(np.float32)
    w = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    dev = cl_array.to_device(queue, base)
    if view == "transposed":
        xd, x = dev.transpose((0, 1, 3, 2)), base.transpose(0, 1, 3, 2)
    elif view == "sliced":
        xd, x = dev[:, :, 1:10:2, ::3], base[:, :, 1:10:2, ::3]
    else:
        xd, x = dev[1:], base[1:]
    y = clconv.conv2d(xd, cl_array.to_device(queue, w), padding=1, padding_mode="reflect")
    assert close(y.get(), conv2d_reference(x, w, padding=1, padding_mode="reflect"))
    assert np.array_equal(dev.get(), base)      # the input is left untouched


def test_a_view_of_a_shape_seen_before_reuses_its_gather_kernel_under_threads(
        queue, rng, monkeypatch):
    """The gather kernel of a view's shape and strides is built once per context and shared:
    eight threads gathering views of that layout at once each get their own values."""
    from concurrent.futures import ThreadPoolExecutor
    from clconv import arrays, programs
    built, real_kernel = [], programs.kernel
    monkeypatch.setattr(programs, "kernel",
                        lambda *a, **k: built.append(a[1]) or real_kernel(*a, **k))
    monkeypatch.setattr(arrays, "_gathers", programs.ContextMemo())
    w = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    bases = [rng.standard_normal((2, 4, 12, 14)).astype(np.float32) for _ in range(24)]
    wd = cl_array.to_device(queue, w)

    def call(base):
        return clconv.conv2d(cl_array.to_device(queue, base)[:, :, 1:10:2, ::3], wd,
                             padding=1).get()

    with ThreadPoolExecutor(8) as pool:
        for base, y in zip(bases, pool.map(call, bases)):
            assert close(y, conv2d_reference(base[:, :, 1:10:2, ::3], w, padding=1))
    assert 1 <= built.count("gather.cl.mako") <= 8      # at most one per racing first call
    before = built.count("gather.cl.mako")
    call(bases[0])
    assert built.count("gather.cl.mako") == before


def test_operand_on_another_context_is_rejected(queue, rng):
    other = cl.CommandQueue(cl.Context([queue.device]))
    x = cl_array.to_device(other, np.ones((1, 1, 4, 4), np.float32))
    w = cl_array.to_device(queue, np.ones((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="context"):
        clconv.conv2d(x, w)


def test_explicit_queue_argument(rng):
    device = clconv.queue_for().device
    own = cl.CommandQueue(cl.Context([device]))
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    y = clconv.conv2d(x, w, queue=own)
    assert isinstance(y, np.ndarray) and close(y, conv2d_reference(x, w))
    with pytest.raises(TypeError, match="queue"):
        clconv.conv2d(x, w, queue="not a queue")


def test_module_with_device_input_and_device_choice(rng):
    device = clconv.queue_for().device
    m = clconv.Conv2d(3, 4, 3, padding=1, device=device.name[:5])
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    y = m(cl_array.to_device(m.queue, x))
    assert isinstance(y, cl_array.Array)
    assert close(y.get(), conv2d_reference(x, m.weight, m.bias, padding=1))


def test_batch_zero_on_device(queue):
    x = cl_array.empty(queue, (0, 3, 5, 5), np.float32)
    y = clconv.conv2d(x, np.ones((2, 3, 3, 3), np.float32))
    assert isinstance(y, cl_array.Array) and y.shape == (0, 2, 3, 3)
