"""What must never hang, leak or grow without bound: oversized calls, fork, the memo tables.

The hang and fork cases run in a child process with a timeout: a regression fails the
test instead of stopping the suite.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import clconv
from clconv import planner, programs
from clconv.programs import LRUTable

from reference import assert_matches

TIMEOUT = 240       # seconds for a child: a build of a few kernels, on a slow shared machine


def run_child(source, env=None):
    """Run source in a fresh interpreter; its stdout, after asserting it exited 0."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(source)], capture_output=True,
                          text=True, timeout=TIMEOUT, env=dict(os.environ, **(env or {})))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_an_overflowing_size_is_refused_and_later_calls_still_run():
    out = run_child("""
        import numpy as np, clconv
        x = np.ones((2, 3, 8, 8), np.float32); w = np.ones((4, 3, 3, 3), np.float32)
        for padding in ((0, 2**61), (2**40, 0), 2**31):
            try:
                clconv.conv2d(x, w, padding=padding)
            except ValueError as err:
                assert "padding must be at most 2**31 - 1" in str(err), err
            else:
                raise AssertionError(f"padding={padding} was accepted")
        y = clconv.conv2d(x, w, padding=1)       # the queue still works
        assert y.shape == (2, 4, 8, 8) and float(y[0, 0, 4, 4]) == 27.0
        print("ok")
    """)
    assert out.strip() == "ok"


FORKED = """
    import multiprocessing, os, sys
    import numpy as np, clconv
    x = np.ones((1, 3, 8, 8), np.float32); w = np.ones((4, 3, 3, 3), np.float32)

    def call(_):
        try:
            return float(clconv.conv2d(x, w).sum())
        except clconv.ForkedProcessError as err:
            return str(err)

    def main(when):
        if when == "before":     # forked before any OpenCL use: the child may use it
            pid = os.fork()
            if pid == 0:
                os._exit(0 if call(0) == 3888.0 else 3)
            _, status = os.waitpid(pid, 0)
            print("child", os.waitstatus_to_exitcode(status))
        print("parent", call(0))
        if when == "after":      # the parent has used OpenCL: a forked child refuses
            with multiprocessing.get_context("fork").Pool(1) as pool:
                print("fork pool", pool.map_async(call, [0]).get(timeout=60)[0])
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                print("spawn pool", pool.map_async(call, [0]).get(timeout=200)[0])

    if __name__ == "__main__":   # spawn imports this file again in its workers
        main(sys.argv[1])
"""


def test_fork_after_use_raises_a_clear_error_instead_of_hanging(tmp_path):
    script = tmp_path / "forked.py"              # spawn re-imports the main module: a file
    script.write_text(textwrap.dedent(FORKED))
    done = subprocess.run([sys.executable, str(script), "after"], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["parent"] == "3888.0"
    assert "forked from one that had already used OpenCL" in lines["fork"]
    assert "'spawn'" in lines["fork"]
    assert done.stdout.splitlines()[-1] == "spawn pool 3888.0"


def test_fork_before_any_use_works(tmp_path):
    script = tmp_path / "forked.py"
    script.write_text(textwrap.dedent(FORKED))
    done = subprocess.run([sys.executable, str(script), "before"], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["child 0", "parent 3888.0"]


# --- bounded memo tables ---------------------------------------------------------------------

def test_lru_table_keeps_the_most_recently_used():
    table = LRUTable(3)
    for key in "abc":
        table[key] = key.upper()
    assert table.get("a") == "A"                 # a is now the most recent
    table["d"] = "D"
    assert list(table) == ["c", "a", "d"] and table.get("b") is None
    table["c"] = "C2"                            # replacing refreshes too
    table["e"] = "E"
    assert list(table) == ["d", "c", "e"]


def test_memo_tables_stay_bounded_over_many_shapes(queue, monkeypatch):
    monkeypatch.setenv("CLCONV_MEMO_SIZE", "3")
    planner.forget()
    programs._programs.clear()
    try:
        w = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
        for height in range(5, 13):
            x = np.random.default_rng(height).standard_normal((1, 2, height, 7))
            x = x.astype(np.float32)
            y = clconv.conv2d(x, w, padding=1, queue=queue)
            assert_matches(y, x, w, None, padding=1)
        for memo in (planner._plans, planner._launches, programs._programs):
            assert 0 < len(memo.table(queue.context)) <= 3
    finally:
        monkeypatch.delenv("CLCONV_MEMO_SIZE")
        planner.forget()
        programs._programs.clear()


@pytest.mark.parametrize("value", ["0", "-1", "many", "2.5"])
def test_memo_size_setting_is_checked(monkeypatch, value):
    monkeypatch.setenv("CLCONV_MEMO_SIZE", value)
    with pytest.raises(ValueError, match="CLCONV_MEMO_SIZE must be a positive integer"):
        clconv.options.memo_size()


# --- NumPy operands used in place ----------------------------------------------------------

def test_numpy_operands_in_place_any_alignment_layout_and_under_threads(queue):
    """Where the device shares the host's memory NumPy operands are wrapped, not copied: an
    input off any 128-byte boundary, a read-only one, a strided view, and eight threads
    calling at once all give the reference's result, in fresh arrays."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    raw = rng.standard_normal(4 * 9 * 11 + 3).astype(np.float32)
    inputs = {"misaligned": raw[3:].reshape(1, 4, 9, 11)}
    read_only = rng.standard_normal((2, 4, 9, 11)).astype(np.float32)
    read_only.flags.writeable = False
    inputs["read-only"] = read_only
    inputs["strided"] = rng.standard_normal((2, 4, 9, 22)).astype(np.float32)[..., ::2]
    for name, x in inputs.items():
        before = x.copy()
        y = clconv.conv2d(x, w, padding=1, queue=queue)
        assert not np.shares_memory(y, x), name
        assert_matches(y, x, w, None, padding=1)
        np.testing.assert_array_equal(x, before)          # inputs are never written

    def call(seed):
        x = np.random.default_rng(seed).standard_normal((2, 4, 9, 11)).astype(np.float32)
        return x, clconv.conv2d(x, w, padding=1, queue=queue)

    with ThreadPoolExecutor(8) as pool:
        for x, y in pool.map(call, range(64)):
            assert_matches(y, x, w, None, padding=1)


def check_from_eight_threads(queue, w, count, gradients):
    """count calls of the forward and of gradients(x, dy) -> (dx, dw[, db]), with random
    inputs and w (6, 4, 3, 3), from eight threads at once, against torch's autograd."""
    from concurrent.futures import ThreadPoolExecutor
    torch = pytest.importorskip("torch")

    def call(seed):
        r = np.random.default_rng(seed)
        x = r.standard_normal((1 + seed % 3, 4, 9, 11)).astype(np.float32)
        dy = r.standard_normal((x.shape[0], 6, 9, 11)).astype(np.float32)
        return x, dy, clconv.conv2d(x, w, padding=1, queue=queue), gradients(x, dy)

    with ThreadPoolExecutor(8) as pool:
        for x, dy, y, grads in pool.map(call, range(count)):
            xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
            yt = torch.nn.functional.conv2d(xt, wt, padding=1)
            yt.backward(torch.from_numpy(dy))
            expected = (yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(),
                        dy.sum(axis=(0, 2, 3)))
            for ours, theirs in zip((y, *grads), expected):
                np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alignment", [None, 0, 1 << 30],
                         ids=["probed", "maps-forced", "misaligned-for-the-rule"])
def test_numpy_results_with_or_without_a_map(queue, monkeypatch, alignment):
    """A NumPy result is read with no map only where writes_in_place found that kernels
    write the array's own memory, at an alignment the array has: the probe's answer, maps
    forced (0) and an alignment no array has (maps again) all give torch's results, forward
    and both gradients, from eight threads at once."""
    import pyopencl as cl
    from clconv import arrays
    if not arrays.shares_host_memory(queue):
        pytest.skip("the device has memory of its own: results are copied")
    if alignment is not None:
        monkeypatch.setattr(arrays, "writes_in_place", lambda queue: alignment)
    maps, real_map = [], cl.enqueue_map_buffer
    monkeypatch.setattr(cl, "enqueue_map_buffer",
                        lambda *a, **k: maps.append(1) or real_map(*a, **k))
    w = np.random.default_rng(10).standard_normal((6, 4, 3, 3)).astype(np.float32)
    check_from_eight_threads(queue, w, 24, lambda x, dy: clconv.conv2d_backward(
        x, w, dy, padding=1, queue=queue))
    # Each call maps its results (one forward, three gradients) or none of them.
    if alignment is not None:
        assert len(maps) == 24 * 4
    elif arrays.writes_in_place(queue) == 16:   # NumPy's memory is 16-byte aligned at least
        assert not maps


def test_writes_in_place_is_probed_once_per_device_and_only_on_cpus(queue, monkeypatch):
    import dataclasses
    from clconv import arrays
    found = arrays.writes_in_place(queue)
    info = clconv.device.queried_info(queue.device)
    assert found in (0, 16, info.base_addr_align)
    if not info.is_cpu:
        assert found == 0
    probes = []
    monkeypatch.setattr(arrays, "_lands_in_place", lambda *a: probes.append(a) or True)
    assert arrays.writes_in_place(queue) == found and not probes      # remembered
    monkeypatch.setattr(arrays, "_in_place", {})
    monkeypatch.setattr(arrays, "queried_info",
                        lambda device: dataclasses.replace(info, is_cpu=False))
    assert arrays.writes_in_place(queue) == 0 and not probes    # a GPU is never trusted


def test_a_numpy_operand_of_a_device_call_may_be_freed_at_once(queue):
    """A call with a device input returns before its kernels finish: a NumPy weight passed as
    a temporary must be copied, not used in place (its memory, freed and refilled at once,
    corrupted every result before)."""
    import pyopencl.array as cl_array
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 32, 40, 40)).astype(np.float32)
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    x_device = cl_array.to_device(queue, x)
    for _ in range(5):
        y = clconv.conv2d(x_device, w.copy(), padding=1)      # the copy goes at once
        junk = [np.full(w.shape, np.nan, np.float32) for _ in range(20)]  # noqa: F841
        assert_matches(y.get(), x, w, None, padding=1)


def test_scratch_buffers_are_reused_and_safe_under_threads(queue):
    """Staging and split-sum scratch buffers are kept per queue and reused by later calls;
    eight threads sharing the queue, each with other problems and batch sizes (so with
    scratch of other sizes), all get the reference's results."""
    from concurrent.futures import ThreadPoolExecutor
    from clconv import scratch
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    x = rng.standard_normal((2, 4, 9, 11)).astype(np.float32)
    clconv.conv2d(x, w, padding=1, queue=queue)        # zero padding: the input is staged
    kept = dict(scratch.of(queue).buffers)
    assert kept, "a staged call keeps its scratch buffer"
    clconv.conv2d(x, w, padding=1, queue=queue)
    assert all(scratch.of(queue).buffers[role] is b for role, b in kept.items())

    # Two shapes (kernels are built per shape), strided or not, of three batch sizes.
    cases = [((1 + seed % 3, 4) + ((9, 11), (7, 10))[seed % 2], 1 + seed // 2 % 2)
             for seed in range(48)]

    def call(seed):
        shape, stride = cases[seed]
        r = np.random.default_rng(seed)
        x = r.standard_normal(shape).astype(np.float32)
        y = clconv.conv2d(x, w, padding=1, stride=stride, queue=queue)
        dy = r.standard_normal(y.shape).astype(np.float32)
        return x, dy, y, clconv.conv2d_weight_grad(x, w.shape, dy, padding=1, stride=stride,
                                                   queue=queue)

    with ThreadPoolExecutor(8) as pool:
        for seed, (x, dy, y, dw) in enumerate(pool.map(call, range(48))):
            stride = cases[seed][1]
            assert_matches(y, x, w, None, padding=1, stride=stride)
            expected = torch.nn.grad.conv2d_weight(torch.from_numpy(x), w.shape,
                                                   torch.from_numpy(dy), padding=1,
                                                   stride=stride).numpy()
            np.testing.assert_allclose(dw, expected, rtol=1e-4, atol=1e-4)
    clconv.release_scratch()
    assert not scratch.of(queue).buffers


def test_an_out_of_order_queue_gets_new_scratch_each_launch(queue):
    import pyopencl as cl
    from clconv import scratch
    ooo = cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE
    if not queue.device.queue_properties & ooo:
        pytest.skip("the device has no out-of-order queues")
    other = cl.CommandQueue(queue.context, queue.device,
                            properties=ooo | cl.command_queue_properties.PROFILING_ENABLE)
    rng = np.random.default_rng(8)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    for n in (1, 3):
        x = rng.standard_normal((n, 4, 9, 11)).astype(np.float32)
        assert_matches(clconv.conv2d(x, w, padding=1, queue=other), x, w, None, padding=1)
    assert not scratch.of(other).buffers


def test_copies_through_pinned_staging_where_memory_is_not_shared(queue, monkeypatch):
    """On a device with memory of its own (a GPU), NumPy operands and results go through the
    queue's pinned staging buffers, reused call after call: forced here on the CPU device,
    eight threads at once, forward and both gradients all give torch's results."""
    import pyopencl as cl
    from clconv import arrays, scratch
    monkeypatch.setattr(arrays, "shares_host_memory", lambda queue: False)
    w = np.random.default_rng(9).standard_normal((6, 4, 3, 3)).astype(np.float32)
    check_from_eight_threads(queue, w, 32, lambda x, dy: (
        clconv.conv2d_input_grad(x.shape, w, dy, padding=1, queue=queue),
        clconv.conv2d_weight_grad(x, w.shape, dy, padding=1, queue=queue)))
    pinned = cl.mem_flags.READ_WRITE | cl.mem_flags.ALLOC_HOST_PTR
    kept = scratch.of(queue).buffers
    assert {("upload0", pinned), ("upload1", pinned), ("download", pinned)} <= set(kept)
    staged = kept["upload0", pinned]
    clconv.conv2d(np.ones((1, 4, 9, 11), np.float32), w, padding=1, queue=queue)
    assert scratch.of(queue).buffers["upload0", pinned] is staged        # reused
