"""examples/train_ddp.py: a converted model trained under DistributedDataParallel (gloo, 2
spawned processes) has the gradients and, after a few SGD steps, the parameters of one
process trained on the full batch, and rank 0's gradients really are the all-reduced ones."""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available",
                allow_module_level=True)

# Not _cases.load_example: spawn pickles the ranks' function by module name, so the spawned
# children (which get this sys.path) must be able to import the example as a module.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import train_ddp  # noqa: E402

STEPS, N = 3, 4


@pytest.fixture(scope="module")
def full():
    """One process on the full batches: (grads of the first step, parameters after STEPS)."""
    return train_ddp.single_process(STEPS, n=N)


@pytest.fixture(scope="module")
def ranks(full):
    # After `full`, whose first convolution probes the device for this session's cache, so
    # the ranks do not probe at once (and measure each other's load). A hang (a rank stuck
    # in the rendezvous or an all-reduce) fails after the timeout.
    return train_ddp.ddp(world_size=2, steps=STEPS, n=N, timeout=300)


def assert_close(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_ddp_gradients_and_steps_equal_one_process_on_the_full_batch(ranks, full):
    grads, params = ranks[0]
    full_grads, full_params = full
    assert all(np.abs(g).max() > 1e-4 for g in full_grads.values())     # every one is live
    assert_close(grads, full_grads)
    assert_close(params, full_params)
    for other_grads, other_params in ranks[1:]:     # the ranks agree
        assert_close(other_grads, grads)
        assert_close(other_params, params)


def test_rank0_gradients_are_all_reduced(ranks):
    grads, _ = ranks[0]
    alone, _ = train_ddp.single_process(1, n=N, part=slice(0, N // 2))
    # Without the all-reduce rank 0 would have its half batch's gradients: far from these.
    assert train_ddp.max_difference(grads, alone) > 1e-2


def test_a_failing_rank_raises_with_its_traceback():
    # SGD refuses a negative learning rate, in each rank (after the rendezvous): the error
    # must come back here with the rank's traceback, not hang or pass.
    with pytest.raises(Exception, match=r"(?s)Traceback.*Invalid learning rate"):
        train_ddp.ddp(world_size=2, lr=-1.0, timeout=120)


def test_a_hang_fails_and_leaves_no_rank_behind():
    import multiprocessing
    with pytest.raises(TimeoutError):
        train_ddp.ddp(world_size=2, timeout=0.01)       # the ranks cannot even import torch
    assert multiprocessing.active_children() == []
