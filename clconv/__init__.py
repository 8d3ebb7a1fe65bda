"""clconv: torch.nn.Conv2d, exactly, on every OpenCL device."""
__version__ = "0.1.0"

from .autotune import TuningCacheWarning, set_mode as set_tune_mode, tune  # noqa: E402
from .device import NoDeviceError, choose_device, device_info, queue_for  # noqa: E402
from .functional import conv2d  # noqa: E402
from .gradients import conv2d_bias_grad, conv2d_input_grad, conv2d_weight_grad  # noqa: E402
from .module import Conv2d  # noqa: E402
from .options import allow_winograd, set_allow_winograd, winograd_allowed  # noqa: E402
from .problem import Problem  # noqa: E402
from .programs import BuildError  # noqa: E402

__all__ = ["Conv2d", "conv2d", "conv2d_input_grad", "conv2d_weight_grad", "conv2d_bias_grad",
           "Problem", "tune", "set_tune_mode", "allow_winograd", "set_allow_winograd",
           "winograd_allowed",
           "NoDeviceError",
           "BuildError", "TuningCacheWarning", "choose_device", "device_info", "queue_for",
           "__version__"]
