"""clconv: torch.nn.Conv2d, exactly, on every OpenCL device."""
from .version import __version__
from .autotune import tune
from .batch_norm import conv2d_batch_norm, conv2d_batch_norm_backward
from .capabilities import device_info
from .device import ForkedProcessError, NoDeviceError, choose_device, queue_for
from .functional import conv2d
from .gradients import conv2d_backward, conv2d_bias_grad, conv2d_input_grad, conv2d_weight_grad
from .module import Conv2d
from .options import allow_winograd, set_allow_winograd, set_tune_mode, winograd_allowed
from .planner import use_algorithm
from .problem import Problem
from .programs import BuildError
from .scratch import release as release_scratch
from .store import TuningCacheWarning

__all__ = ["Conv2d", "conv2d", "conv2d_input_grad", "conv2d_weight_grad", "conv2d_bias_grad",
           "conv2d_backward", "conv2d_batch_norm", "conv2d_batch_norm_backward", "Problem",
           "tune", "set_tune_mode", "use_algorithm", "allow_winograd",
           "set_allow_winograd", "winograd_allowed", "NoDeviceError", "ForkedProcessError",
           "BuildError", "release_scratch",
           "TuningCacheWarning", "choose_device", "device_info", "queue_for", "__version__"]
