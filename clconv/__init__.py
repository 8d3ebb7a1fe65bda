"""clconv: torch.nn.Conv2d, exactly, on every OpenCL device."""
from .device import NoDeviceError, choose_device, device_info, queue_for
from .functional import conv2d
from .module import Conv2d
from .problem import Problem
from .programs import BuildError

__version__ = "0.1.0"

__all__ = ["Conv2d", "conv2d", "Problem", "NoDeviceError", "BuildError", "choose_device",
           "device_info", "queue_for", "__version__"]
