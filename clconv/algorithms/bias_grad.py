"""The bias gradient: grad_output summed per channel over batch, height and width (a
memory-bound sum, not tuned), split over the batch when the channels alone leave the device
idle; the split partial sums are added in a fixed order by sum_splits."""
from __future__ import annotations

from .. import programs
from ..problem import INT32_LIMIT
from ..capabilities import of_info
from .base import BATCH, Blocks, Buffer, build_step, summed_splits

def splits_for(info, batch, channels):
    """Shares of the batch summed apart: enough independent sums to fill the device."""
    want = 4 * info.compute_units if info.is_cpu else 4096
    splits = 1
    while channels * splits < want and batch >= 2 * splits:
        splits *= 2
    return splits


def constants(info, batch, channels, plane, dtype):
    """What the bias-gradient kernels are specialised on (a hashable memo key too)."""
    splits = splits_for(info, batch, channels)
    storage_t, acc_t = programs.c_types(dtype)
    tw = max(of_info(info).widths_of(dtype))     # a memory-bound sum: the widest vector
    return dict(dtype=dtype, idx_t="int" if batch * channels * plane <= INT32_LIMIT else "long",
                channels=channels, plane=plane, tw=tw, splits=splits,
                out_t=acc_t if splits > 1 else storage_t, plane_vectors=Blocks(plane, tw))


def launcher(queue, constants):
    """run(queue, inputs, output, batch, wait_for) of the bias gradient of constants."""
    channels, splits = constants["channels"], constants["splits"]
    sums = build_step(queue, "bias_grad.cl.mako", "conv2d_bias_grad", constants,
                      (Buffer("dy"), Buffer("db", "out_t", const=False, offset=False), BATCH),
                      lambda b: (channels, splits))

    def main(queue, inputs, output, batch, wait_for):
        return [sums(queue, batch, *inputs[0], output[0], batch, wait_for=wait_for)]
    return summed_splits(queue, main, splits, channels, constants["dtype"], constants["idx_t"])
